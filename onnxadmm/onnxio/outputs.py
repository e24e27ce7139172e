"""Where a run may write, and how: one policy for every file a command writes.

Policy (``check_paths``, before any work): a written path is absent or a regular file (or a symlink to
one), inside a folder that exists and is writable, and it is not — by any spelling (symlink, hard link,
``..``) — a file the run reads (models, their external-data files, calibration/evaluation data, the
config), not inside a data folder the run reads, and not another file the same run writes.

Writes (``OutputSet``): each file is staged beside its target (temporary name, fsync, mode from the
umask like any file the user creates), then all are renamed into place together with SIGINT/SIGTERM/
SIGHUP held, so the model and its reports appear together or not at all. A failed write (disk full,
permission, vanished folder) raises ExportError naming the file, with no temporary file left and any
file that was replaced restored.
"""

from __future__ import annotations

import os
import secrets
import signal
import stat
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import onnx

from ..errors import ExportError
from . import scratch

SIGNALS_HELD = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@dataclass(frozen=True)
class Use:
    """A path a run reads or writes, with what it is for (used in messages)."""

    role: str
    path: Path


def reads_of_model(path: str | os.PathLike, role: str = "input model", writes: Sequence[Use] | None = None
                   ) -> list[Use]:
    """The model file and the external-data files it names. Those live in the model's folder, so the model
    is parsed for them only when one of ``writes`` already exists there (a large model is not read twice
    at start-up to learn nothing); with ``writes`` None it is always parsed."""
    path = Path(path)
    uses = [Use(role, path)]
    folder = os.path.realpath(path.parent)
    could_collide = writes is None or any(os.path.lexists(w.path) and os.path.realpath(w.path.parent) == folder
                                      for w in writes)
    if path.is_file() and could_collide:
        try:
            model = onnx.load(str(path), load_external_data=False)
        except Exception:  # noqa: BLE001 - an unreadable model is reported by the loader
            return uses
        locations = {entry.value for tensor in model.graph.initializer for entry in tensor.external_data
                     if entry.key == "location"}
        uses.extend(Use(f"external data of the {role}", path.parent / location) for location in sorted(locations))
    return uses


def check_paths(reads: Sequence[Use], writes: Sequence[Use]) -> None:
    """Refuse (ExportError, exit 3) any write that breaks the policy in the module docstring, naming
    both paths."""
    for index, write in enumerate(writes):
        _check_writable(write)
        for read in reads:
            if _same_file(write.path, read.path):
                raise ExportError(f"{write.role} {write.path} is the {read.role} {read.path} (same file); "
                                  "choose another name: onnxadmm never writes over a file it reads")
            if read.path.is_dir() and _inside(write.path, read.path):
                raise ExportError(f"{write.role} {write.path} is inside the {read.role} folder {read.path}, "
                                  "which is read as data; write it elsewhere")
        for other in writes[:index]:
            if _same_file(write.path, other.path):
                raise ExportError(f"{write.role} and {other.role} would both be written to {write.path}; "
                                  "give them different names (a report is written as X.json and X.md)")


def _check_writable(write: Use) -> None:
    path = write.path
    if os.path.lexists(path):
        try:
            mode = os.stat(path).st_mode  # follows a symlink: what would be replaced
        except OSError:
            mode = None  # a dangling symlink: the link itself is replaced
        if mode is not None and stat.S_ISDIR(mode):
            raise ExportError(f"{write.role} {path} is a directory; give a file name such as {path}/model.onnx")
        if mode is not None and not stat.S_ISREG(mode):
            kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
                    else "a socket" if stat.S_ISSOCK(mode) else "not a regular file")
            raise ExportError(f"{write.role} {path} is {kind}; onnxadmm writes regular files only (it would "
                              "replace it): give a file path")
    folder = path.parent
    if not folder.is_dir():
        raise ExportError(f"folder {folder} of the {write.role} {path} does not exist; create it first")
    probe = folder / f".onnxadmm-probe-{secrets.token_hex(6)}"
    try:  # a real file: permissions, read-only mounts and pseudo file systems all answer the same way
        with open(probe, "xb"):
            pass
        probe.unlink()
    except OSError as exc:
        raise ExportError(f"cannot write in output folder {folder} (for the {write.role}): "
                          f"{exc.strerror or exc}") from None


def _same_file(a: Path, b: Path) -> bool:
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)  # hard links
    except OSError:
        return False


def _inside(path: Path, folder: Path) -> bool:
    return Path(os.path.realpath(path)).is_relative_to(os.path.realpath(folder))


def umask() -> int:
    """The process umask, read without changing it where Linux allows (``/proc/self/status``)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    current = os.umask(0o022)
    os.umask(current)
    return current


@dataclass
class _Staged:
    temp: Path
    target: Path
    role: str


@dataclass
class OutputSet:
    """Files staged beside their targets, renamed into place together by ``commit``.

    Use as a context manager: leaving the block without ``commit`` removes every staged file."""

    staged: list[_Staged] = field(default_factory=list)
    committed: bool = False

    def __enter__(self) -> "OutputSet":
        return self

    def __exit__(self, *exc) -> None:
        if not self.committed:
            self.discard()

    def write_bytes(self, target: str | os.PathLike, role: str, pieces: Iterable[bytes]) -> int:
        """Stage ``pieces`` for ``target``; returns the bytes written."""
        return self.write_with(target, role, lambda stream: _write_pieces(stream, pieces))

    def write_text(self, target: str | os.PathLike, role: str, text: str) -> int:
        return self.write_bytes(target, role, [text.encode("utf-8", errors="backslashreplace")])

    def write_with(self, target: str | os.PathLike, role: str, writer: Callable) -> int:
        """Stage a file for ``target`` whose content ``writer(binary stream)`` writes; returns its size."""
        target = Path(target)
        temp = target.parent / f".{target.name}.{secrets.token_hex(6)}.tmp"
        scratch.register(temp)
        self.staged.append(_Staged(temp, target, role))
        try:
            with open(temp, "xb") as stream:
                writer(stream)
                stream.flush()
                os.fsync(stream.fileno())
            os.chmod(temp, 0o666 & ~umask())
            return temp.stat().st_size
        except OSError as exc:
            self.discard()
            raise ExportError(f"cannot write the {role} {target}: {exc.strerror or exc}; nothing was "
                              "written") from None

    def commit(self) -> None:
        """Rename every staged file into place with signals held; on failure, restore what was there."""
        held = threading.current_thread() is threading.main_thread()
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS_HELD) if held else None
        done: list[tuple[_Staged, Path | None]] = []
        try:
            for item in self.staged:
                backup = _backup(item.target)
                try:
                    os.replace(item.temp, item.target)
                except OSError as exc:
                    if backup is not None:
                        backup.unlink(missing_ok=True)
                    self._roll_back(done)
                    raise ExportError(f"cannot write the {item.role} {item.target}: {exc.strerror or exc}; "
                                      "nothing was written") from None
                scratch.unregister(item.temp)
                done.append((item, backup))
            for _, backup in done:
                if backup is not None:
                    backup.unlink(missing_ok=True)
                    scratch.unregister(backup)
            for folder in {item.target.parent for item in self.staged}:
                _fsync_folder(folder)
            self.committed = True
        finally:
            if not self.committed:
                self.discard()
            if held:
                signal.pthread_sigmask(signal.SIG_SETMASK, previous)

    @staticmethod
    def _roll_back(done: list[tuple[_Staged, Path | None]]) -> None:
        for item, backup in reversed(done):
            if backup is not None:
                os.replace(backup, item.target)
                scratch.unregister(backup)
            else:
                item.target.unlink(missing_ok=True)

    def discard(self) -> None:
        for item in self.staged:
            scratch.remove(item.temp)
        self.staged.clear()


def _write_pieces(stream, pieces: Iterable[bytes]) -> None:
    for piece in pieces:
        stream.write(piece)


def _backup(target: Path) -> Path | None:
    """A hard link to the file ``target`` would replace, to restore it if the commit fails."""
    if not target.is_file() or target.is_symlink():
        return None
    backup = target.parent / f".{target.name}.{os.getpid()}.bak"
    scratch.register(backup)
    try:
        backup.unlink(missing_ok=True)
        os.link(target, backup)
        return backup
    except OSError:  # no hard links here: the commit then cannot restore this file
        scratch.unregister(backup)
        return None


def _fsync_folder(folder: Path) -> None:
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)
