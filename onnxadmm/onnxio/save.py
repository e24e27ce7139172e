"""Write a model atomically (temporary file in the target folder, then rename), never over the input.

Models whose protobuf would exceed 2 GB are written with external data in ``<name>.data`` next to it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Mapping

import onnx

from ..errors import ExportError

PROTOBUF_LIMIT_BYTES = (1 << 31) - (1 << 20)  # keep 1 MB of margin under protobuf's 2 GB
METADATA_PREFIX = "onnxadmm."


def check_output_path(out: str | os.PathLike, input_path: str | os.PathLike | None) -> Path:
    """Fail early (before any work) when the output cannot or must not be written."""
    out = Path(out)
    if out.exists() and out.is_dir():
        raise ExportError(f"output path {out} is a directory; give a file name such as {out}/model.onnx")
    if input_path is not None:
        source = Path(input_path)
        same = out.resolve() == source.resolve()
        if not same and out.exists() and source.exists():
            same = os.path.samefile(out, source)
        if same:
            raise ExportError(f"output path {out} is the input model; choose another file name "
                              "(onnxadmm never writes over its input)")
        data_file = out.parent / (out.name + ".data")
        if data_file.resolve().parent == source.resolve().parent and data_file.exists() and \
                _referenced_by(source, data_file.name):
            raise ExportError(f"writing {out} could overwrite {data_file}, which the input model uses "
                              "for external data; choose another output name")
    folder = out.parent if str(out.parent) else Path(".")
    if not folder.exists():
        raise ExportError(f"output folder {folder} does not exist; create it first")
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".onnxadmm-probe-", delete=True):
            pass
    except OSError as exc:
        raise ExportError(f"cannot write in output folder {folder}: {exc.strerror or exc}") from None
    return out


def _referenced_by(model_path: Path, data_name: str) -> bool:
    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception:  # noqa: BLE001 - unreadable input is reported elsewhere
        return False
    return any(entry.key == "location" and entry.value == data_name
               for tensor in model.graph.initializer for entry in tensor.external_data)


def stamp_metadata(model: onnx.ModelProto, entries: Mapping[str, str]) -> None:
    """Merge ``onnxadmm.*`` keys into ``metadata_props``, keeping the producer's own entries."""
    existing = {prop.key: prop for prop in model.metadata_props}
    for key, value in entries.items():
        full_key = key if key.startswith(METADATA_PREFIX) else METADATA_PREFIX + key
        if full_key in existing:
            existing[full_key].value = str(value)
        else:
            model.metadata_props.add(key=full_key, value=str(value))


def read_metadata(model: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props if p.key.startswith(METADATA_PREFIX)}


def save_model_atomic(model: onnx.ModelProto, out: str | os.PathLike) -> int:
    """Write ``model`` to ``out`` atomically; returns the bytes written (model + external data)."""
    out = Path(out)
    folder = out.parent if str(out.parent) else Path(".")
    if model.ByteSize() < PROTOBUF_LIMIT_BYTES:
        blob = model.SerializeToString()
        handle, tmp = tempfile.mkstemp(dir=folder, prefix=f".{out.name}.", suffix=".tmp")
        try:
            with os.fdopen(handle, "wb") as stream:
                stream.write(blob)
                stream.flush()
                os.fsync(stream.fileno())
            os.replace(tmp, out)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return len(blob)
    return _save_with_external_data(model, out, folder)


def _save_with_external_data(model: onnx.ModelProto, out: Path, folder: Path) -> int:
    data_name = out.name + ".data"
    staging = Path(tempfile.mkdtemp(dir=folder, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        staged = staging / out.name
        onnx.save_model(model, str(staged), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_name, size_threshold=1024)
        total = staged.stat().st_size + (staging / data_name).stat().st_size
        os.replace(staging / data_name, folder / data_name)
        os.replace(staged, out)
        return total
    finally:
        shutil.rmtree(staging, ignore_errors=True)
