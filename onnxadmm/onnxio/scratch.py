"""Temporary files and folders of a run, registered so that no exit path leaves one behind.

Every temporary path the package creates (spilled activations, session files, staged outputs) is made
through ``scratch_folder`` / ``register``. The ``finally`` blocks remove them on every normal or
interrupted exit; ``remove_all`` is the last resort of the signal watchdog (``cli``) when the main thread
is stuck in a long onnxruntime or torch call and cannot run its own cleanup.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

_LIVE: set[Path] = set()
_LOCK = threading.Lock()


def cache_root() -> Path:
    """``$XDG_CACHE_HOME/onnxadmm``: what is kept between runs (latency tables, emulators), unlike scratch."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "onnxadmm"


def register(path: Path) -> None:
    with _LOCK:
        _LIVE.add(Path(path))


def unregister(path: Path) -> None:
    with _LOCK:
        _LIVE.discard(Path(path))


def remove(path: Path) -> None:
    """Delete a registered file or folder (if still there) and forget it."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except OSError:
            pass
    unregister(path)


def remove_all() -> None:
    """Delete every registered path (the watchdog's cleanup; safe to call from any thread)."""
    with _LOCK:
        paths = list(_LIVE)
    for path in paths:
        remove(path)


def new_folder(prefix: str, root: str | os.PathLike | None = None) -> Path:
    """Create and register a fresh private folder. The name is registered before ``mkdir``, so an
    interrupt at any point leaves nothing that ``remove_all`` does not know."""
    base = Path(root or tempfile.gettempdir())
    while True:
        folder = base / f"{prefix}{secrets.token_hex(6)}"
        register(folder)
        try:
            folder.mkdir(mode=0o700)
            return folder
        except FileExistsError:
            unregister(folder)
        except BaseException:  # interrupted around mkdir: the caller never learns the name
            remove(folder)
            raise


@contextmanager
def scratch_folder(prefix: str, root: str | os.PathLike | None = None) -> Iterator[Path]:
    """A registered temporary folder, removed on leaving the block however it is left."""
    folder = new_folder(prefix, root)
    try:
        yield folder
    finally:
        remove(folder)
