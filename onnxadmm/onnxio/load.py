"""Read an ONNX file defensively: every failure becomes a BadInputError that names the file and the fix.

External data is read only from files inside the model's own folder (no absolute paths, no ``..``); large
initializers stay in those files, read when needed (``weights.py``). The input file is only ever opened for
reading.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError
from onnx import external_data_helper

from ..errors import BadInputError, UnsupportedModelError
from .graph import all_graphs
from .save import serialized_pieces, weightless
from .weights import is_mapped, map_external_data, value_bytes

MIN_OPSET = 7


@dataclass
class LoadedModel:
    """A parsed model with where it came from."""

    model: onnx.ModelProto
    path: Path | None
    sha256: str
    size_bytes: int
    notes: list[str] = field(default_factory=list)  # repairs made while loading (for the report)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_model(path: str | os.PathLike) -> LoadedModel:
    """Parse, check external-data paths, load them, and check opset and graph validity."""
    path = Path(path)
    if not path.exists():
        raise BadInputError(f"model file not found: {path}")
    if path.is_dir():
        raise BadInputError(f"{path} is a directory; give the path of an .onnx file")
    size_bytes = path.stat().st_size
    if size_bytes == 0:
        raise BadInputError(f"{path} is empty (0 bytes); re-export the model")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, UnicodeDecodeError) as exc:
        raise BadInputError(
            f"{path} is not a readable ONNX model (protobuf parse failed: {exc}); "
            "the file may be truncated or not ONNX at all") from None
    except OSError as exc:
        raise BadInputError(f"cannot read {path}: {exc}") from None
    _check_looks_like_onnx(model, path)
    notes = repair_text_fields(model, str(path))
    _load_external_data(model, path)
    check_model(model, str(path))
    return LoadedModel(model=model, path=path, sha256=file_sha256(path), size_bytes=size_bytes, notes=notes)


def model_from_proto(model: onnx.ModelProto) -> LoadedModel:
    """Wrap an in-memory ModelProto (Python API) with the same checks as a file, minus the file."""
    if not isinstance(model, onnx.ModelProto):
        raise BadInputError(f"expected an onnx.ModelProto or a path, got {type(model).__name__}")
    _check_looks_like_onnx(model, "<in-memory model>")
    if any(isinstance(value, bytes) for _, _, value, _ in _text_fields(model, "model")):
        model = copy.deepcopy(model)  # the caller's object is never modified
    notes = repair_text_fields(model, "<in-memory model>")
    for tensor in _all_initializers(model.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL and not is_mapped(tensor):
            raise BadInputError("in-memory model still refers to external data; load it from its file")
    check_model(model, "<in-memory model>")
    size, pieces = serialized_pieces(model)
    digest = hashlib.sha256()
    for piece in pieces:
        digest.update(piece)
    return LoadedModel(model=model, path=None, sha256=digest.hexdigest(), size_bytes=size, notes=notes)


def _check_looks_like_onnx(model: onnx.ModelProto, where) -> None:
    if model.ir_version <= 0 or not model.HasField("graph") or not model.opset_import:
        raise BadInputError(f"{where} parsed, but it is not an ONNX model (no ir_version, graph or "
                            "opset_import)")
    if len(model.graph.node) == 0:
        raise BadInputError(f"{where} has an empty graph (no nodes)")


def _all_initializers(graph: onnx.GraphProto):
    return (tensor for g in all_graphs(graph) for tensor in g.initializer)


def _load_external_data(model: onnx.ModelProto, path: Path) -> None:
    folder = path.resolve().parent
    for tensor in _all_initializers(model.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = external_data_helper.ExternalDataInfo(tensor)
        location = info.location
        target = (folder / location).resolve()
        if os.path.isabs(location) or not target.is_relative_to(folder):
            raise BadInputError(
                f"initializer {tensor.name!r} points to external data {location!r}, outside the model's "
                f"folder {folder}; move the data file next to the model and use a relative path")
        if not target.is_file():
            raise BadInputError(f"external data file {location!r} of initializer {tensor.name!r} "
                                f"is missing (looked in {folder})")
        length = value_bytes(tensor)  # what its type and shape need (None: packed or string)
        if info.length and length is not None and info.length != length:
            raise BadInputError(f"initializer {tensor.name!r} declares {info.length} bytes of external data, but "
                                f"its type and shape {list(tensor.dims)} need {length}; the model is corrupt")
        needed = (info.offset or 0) + (info.length or length or 0)
        if target.stat().st_size < needed:
            raise BadInputError(f"external data file {location!r} is shorter than initializer "
                                f"{tensor.name!r} needs ({needed} bytes); the file is truncated")
    try:
        map_external_data(model, folder)
    except (OSError, ValueError) as exc:
        raise BadInputError(f"cannot load external data of {path}: {exc}") from None


def default_opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    raise UnsupportedModelError("the model imports no default-domain (ai.onnx) opset")


@functools.lru_cache(maxsize=1)
def onnxruntime_max_opset() -> int:
    """Highest ai.onnx opset this onnxruntime accepts, probed with a one-node model."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    def loads(opset: int) -> bool:
        graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
        probe = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
        try:
            ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
            return True
        except Exception:  # noqa: BLE001 - any refusal means "not supported"
            return False

    best = 17
    for opset in range(18, onnx.defs.onnx_opset_version() + 3):
        if not loads(opset):
            break
        best = opset
    return best


def check_model(model: onnx.ModelProto, where: str) -> None:
    """Opset range, then onnx.checker; failures name the problem and how to fix it."""
    opset = default_opset(model)
    if opset < MIN_OPSET:
        raise UnsupportedModelError(
            f"{where} uses ai.onnx opset {opset}; onnxadmm needs >= {MIN_OPSET}. Upgrade it with "
            "onnx.version_converter.convert_version(model, 17)")
    limit = onnxruntime_max_opset()
    if opset > limit:
        raise UnsupportedModelError(
            f"{where} uses ai.onnx opset {opset}, newer than this onnxruntime supports ({limit}); "
            f"re-export at opset <= {limit} or upgrade onnxruntime")
    try:
        onnx.checker.check_model(weightless(model))
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "invalid graph"
        raise UnsupportedModelError(f"{where} fails onnx.checker: {first}") from None
    except UnicodeDecodeError as exc:  # a string field (a name, a doc string) is not valid UTF-8
        raise BadInputError(f"{where} has a text field that is not valid UTF-8 ({exc.reason} at byte "
                            f"{exc.start}); the file is corrupt") from None


def full_check(model: onnx.ModelProto) -> str | None:
    """None when onnx.checker's full check (strict shape inference) passes, else its first line. Checked on the
    ``weightless`` proxy, so a model of any size is checked without a copy of its weights."""
    try:
        onnx.checker.check_model(weightless(model), full_check=True)
        return None
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        return (str(exc).strip().splitlines() or ["invalid"])[0]


def repair_text_fields(model: onnx.ModelProto, where: str) -> list[str]:
    """Text fields that are not valid UTF-8 (protobuf hands them over as bytes): doc strings are decoded
    with U+FFFD replacement characters (returned as notes); any other text (a name, an op type, an
    attribute) is refused, naming it, since a name must round-trip exactly."""
    notes: list[str] = []
    for owner, field_name, value, place in _text_fields(model, "model"):
        if not isinstance(value, bytes):
            continue
        if field_name == "doc_string":
            setattr(owner, field_name, value.decode("utf-8", errors="replace"))
            notes.append(f"{place}.doc_string was not valid UTF-8; undecodable bytes replaced by U+FFFD")
        else:
            shown = value.decode("utf-8", errors="backslashreplace")
            raise BadInputError(f"{where}: {place}.{field_name} {shown!r} is not valid UTF-8; re-export the model "
                                "with UTF-8 names (ONNX requires them)")
    return notes


def _text_fields(message, place: str):
    """(message, field name, value, place) for every singular string field, recursively; tensor payloads
    are skipped (only their name and doc string are text)."""
    for descriptor, value in message.ListFields():
        if descriptor.type == descriptor.TYPE_STRING:
            if _is_repeated(descriptor):
                if any(isinstance(v, bytes) for v in value):
                    raise BadInputError(f"{place}.{descriptor.name} holds text that is not valid UTF-8; "
                                        "re-export the model")
            else:
                yield message, descriptor.name, value, place
        elif descriptor.type == descriptor.TYPE_MESSAGE:
            items = value if _is_repeated(descriptor) else [value]
            for index, item in enumerate(items):
                label = getattr(item, "name", "") or str(index)
                child = f"{place}.{descriptor.name}[{label!r}]" if _is_repeated(descriptor) else \
                    f"{place}.{descriptor.name}"
                if isinstance(item, onnx.TensorProto):
                    for text_field in ("name", "doc_string"):
                        yield item, text_field, getattr(item, text_field), child
                else:
                    yield from _text_fields(item, child)


def _is_repeated(descriptor) -> bool:
    return descriptor.is_repeated if hasattr(descriptor, "is_repeated") else \
        descriptor.label == descriptor.LABEL_REPEATED


def as_loaded(model) -> LoadedModel:
    """``model`` as a LoadedModel: a path is read, a ModelProto wrapped, a LoadedModel returned as it is."""
    if isinstance(model, LoadedModel):
        return model
    return model_from_proto(model) if isinstance(model, onnx.ModelProto) else load_model(model)
