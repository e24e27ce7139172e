"""Calibration and evaluation samples, from any of the sources users have, checked against the model.

Sources (``open_samples``): a ``.npz`` keyed by input name (samples on axis 0); a folder of ``.npz`` /
``.npy`` files or the ONNX model-zoo ``test_data_set_*/input_*.pb`` layout; ``random:N`` (flagged as
not representative); in Python, an onnxruntime ``CalibrationDataReader`` (``get_next()``), an iterable
of ``{input_name: array}`` or a dict of arrays. Names, dtypes, ranks, static dimensions and finiteness
are checked, each error naming the input and the fix.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import CalibrationError, ConfigError
from ..onnxio.graph import TensorType


@dataclass(frozen=True)
class SampleSet:
    """In-memory samples: one array per model input, samples on axis 0, plus optional labels."""

    arrays: Mapping[str, np.ndarray]
    source: str
    representative: bool = True
    labels: np.ndarray | None = None
    fixed_batch: int | None = None  # the model's static batch size, if it has one
    sequence_axes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)  # see ``sequence_axes``

    @property
    def num_samples(self) -> int:
        return len(next(iter(self.arrays.values())))

    def subset(self, indices: np.ndarray) -> "SampleSet":
        labels = None if self.labels is None else self.labels[indices]
        return replace(self, arrays={k: v[indices] for k, v in self.arrays.items()}, labels=labels)

    def spread(self, count: int) -> "SampleSet":
        """At most ``count`` evenly spaced samples, in whole batches of a fixed-batch model."""
        count = min(count, self.num_samples)
        if self.fixed_batch:
            count = max(self.fixed_batch, count // self.fixed_batch * self.fixed_batch)
        return self.subset(evenly_spaced(self.num_samples, count))

    def feed(self, batch_size: int, sequence_length: int | None = None) -> dict[str, np.ndarray]:
        """The first ``batch_size`` samples as one feed, cycling when there are fewer (for timing); with
        ``sequence_length``, every sequence axis cut to it or padded with zeros (padding tokens, mask 0)."""
        index = np.arange(batch_size) % self.num_samples
        feed = {name: array[index] for name, array in self.arrays.items()}
        if sequence_length is None:
            return feed
        if not self.sequence_axes:
            raise ConfigError(f"--latency-seq-len {sequence_length}: no input of the model has a dynamic second "
                              "(sequence) axis; leave it out")
        return at_sequence_length(feed, self.sequence_axes, sequence_length)

    def batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        size = self.fixed_batch or batch_size
        for start in range(0, self.num_samples, size):
            yield {k: v[start:start + size] for k, v in self.arrays.items()}

    def num_batches(self, batch_size: int) -> int:
        size = self.fixed_batch or batch_size
        return -(-self.num_samples // size)


def run_all(sess, samples: SampleSet, batch_size: int) -> dict[str, np.ndarray]:
    """Every output of an onnxruntime session over all samples, in batches, concatenated on axis 0."""
    names = [o.name for o in sess.get_outputs()]
    chunks: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for batch in samples.batches(batch_size):
        for name, value in zip(names, sess.run(names, batch)):
            chunks[name].append(np.asarray(value))
    return {n: np.concatenate(v, axis=0) if v[0].ndim else np.stack(v) for n, v in chunks.items()}


def sequence_axes(inputs: Mapping[str, TensorType]) -> dict[str, tuple[int, ...]]:
    """Per input whose second axis is not a fixed size (a transformer's token axis), the axes that share its
    size: axis 1, and every later axis with the same symbolic name (a [B, S, S] mask)."""
    axes = {}
    for name, tensor in inputs.items():
        shape = tensor.shape or ()
        if len(shape) < 2 or isinstance(shape[1], int):
            continue
        axes[name] = (1, *(a for a in range(2, len(shape)) if shape[1] is not None and shape[a] == shape[1]))
    return axes


def at_sequence_length(feed: Mapping[str, np.ndarray], axes: Mapping[str, tuple[int, ...]], length: int
                       ) -> dict[str, np.ndarray]:
    """``feed`` with every sequence axis cut to ``length`` or padded with zeros (padding tokens, mask 0)."""
    out = dict(feed)
    for name, names_axes in axes.items():
        array = feed[name]
        for axis in names_axes:
            if array.shape[axis] >= length:
                array = np.take(array, np.arange(length), axis=axis)
            else:
                pad = [(0, 0)] * array.ndim
                pad[axis] = (0, length - array.shape[axis])
                array = np.pad(array, pad)
        out[name] = np.ascontiguousarray(array)
    return out


def evenly_spaced(total: int, count: int) -> np.ndarray:
    """``count`` distinct indices spread evenly over ``range(total)`` (deterministic, class-balanced
    on data sorted by class)."""
    if count >= total:
        return np.arange(total)
    return np.floor(np.arange(count) * (total / count)).astype(np.int64)


def select(samples: SampleSet, count: int | None, what: str = "calibration") -> tuple[SampleSet, np.ndarray]:
    """Keep ``count`` evenly spaced samples; returns the subset and the indices left out."""
    total = samples.num_samples
    if count is None or count == total:
        return samples, np.arange(0)
    flag = "--calib-samples" if what == "calibration" else "--eval-samples"
    if count > total:
        raise CalibrationError(f"asked for {count} {what} samples but {samples.source} holds only {total}; "
                               f"lower {flag} or add data")
    batch = samples.fixed_batch
    if batch and count % batch:
        lower, upper = count // batch * batch, -(-count // batch) * batch
        raise ConfigError(f"{flag} {count}: the model's batch axis is fixed at {batch}, so sample counts must be "
                          f"multiples of it; use {upper}" + (f" or {lower}" if lower else ""))
    keep = evenly_spaced(total, count)
    rest = np.setdiff1d(np.arange(total), keep)
    if batch:  # the held-out rest is run in whole batches too
        rest = rest[:len(rest) // batch * batch]
    return samples.subset(keep), rest


def held_out_rows(num_samples: int, fixed_batch: int | None = None) -> np.ndarray:
    """The held-out rule of the fine-tuning stages (block refinement, distillation): every tenth sample (batch,
    for a model with a fixed batch ``B``), when there are ≥ 20 of them; a boolean mask."""
    batch = fixed_batch or 1
    index = np.arange(num_samples) // batch
    if num_samples // batch < 20:
        return np.zeros(num_samples, bool)
    return (index % 10 == 9) & (index < num_samples // batch)


def evaluation_set(evaluation, inputs, calib_all: SampleSet, rest: np.ndarray, used: SampleSet,
                   validate_config, seed: int) -> tuple[SampleSet, bool]:
    """The held-out data for validation: ``evaluation`` when given, else the calibration samples ``select``
    left out, else the calibration samples themselves (then reported as not held out)."""
    if evaluation is not None:
        samples = open_samples(evaluation, inputs, validate_config.labels, seed, what="evaluation")
        held_out = True
    elif len(rest):
        samples, held_out = calib_all.subset(rest), True
    else:
        samples, held_out = used, False
    if validate_config.eval_samples:
        samples, _ = select(samples, min(validate_config.eval_samples, samples.num_samples), "evaluation")
    return samples, held_out


@dataclass
class RunSamples:
    """The samples of one ``compress`` run."""

    calib: SampleSet  # the calibration samples used
    solving: SampleSet  # what the layer-wise solve and block refinement see (distillation checks on the rest)
    evaluation: SampleSet  # what validation compares on
    held_out: bool  # whether ``evaluation`` is disjoint from ``calib``
    notes: list[str]


def run_samples(calibration, evaluation, inputs: Mapping[str, TensorType], config, validate_config) -> RunSamples:
    """Open the calibration data (labels optional), keep ``config.calib_samples`` of it, and choose the
    evaluation samples (``evaluation_set``); with distillation, its held-out rows are left out of the solve."""
    calib_all = open_samples(calibration, inputs, validate_config.labels, config.seed, labels_required=False)
    calib, rest = select(calib_all, config.calib_samples)
    samples, held_out = evaluation_set(evaluation, inputs, calib_all, rest, calib, validate_config, config.seed)
    if config.latency_seq_len:
        calib.feed(1, config.latency_seq_len)  # a ConfigError now when no input has a sequence axis
    if not config.distill_epochs:
        return RunSamples(calib, calib, samples, held_out, [])
    solving = calib.subset(np.flatnonzero(~held_out_rows(calib.num_samples, calib.fixed_batch)))
    return RunSamples(calib, solving, samples, held_out, [
        f"{calib.num_samples - solving.num_samples} of {calib.num_samples} calibration samples held out of the "
        "layer-wise solve and block refinement, to check the distillation on"])


def open_samples(spec: Any, inputs: Mapping[str, TensorType], labels_key: str | None = None,
                 seed: int = 0, what: str = "calibration", labels_required: bool = True) -> SampleSet:
    """Read ``spec`` and check it against the model ``inputs`` (name -> type).

    ``labels_key`` names a labels array to set apart; with ``labels_required=False`` (calibration data,
    which is used unlabelled) its absence is fine."""
    if isinstance(spec, SampleSet):
        raw, source, representative, labels = dict(spec.arrays), spec.source, spec.representative, spec.labels
    elif isinstance(spec, (str, os.PathLike)) and str(spec).startswith("random:"):
        raw, labels = _random(str(spec), inputs, seed), None
        source, representative = str(spec), False
        if labels_key and labels_required:
            raise CalibrationError(f"--labels {labels_key!r} cannot be used with {spec}: random data "
                                   "has no labels")
    elif isinstance(spec, (str, os.PathLike)):
        raw, source = _read_path(Path(spec), inputs, what), str(spec)
        representative = True
        labels = raw.pop(labels_key, None) if labels_key else None
        if labels_key and labels is None and labels_required:
            raise CalibrationError(f"{what} data {spec} has no array named {labels_key!r} for --labels "
                                   f"(it has: {', '.join(sorted(raw))})")
    elif isinstance(spec, Mapping):
        raw, source, representative = {k: np.asarray(v) for k, v in spec.items()}, "dict of arrays", True
        labels = raw.pop(labels_key, None) if labels_key else None
    elif hasattr(spec, "get_next"):
        raw, source, representative, labels = _drain_reader(spec), type(spec).__name__, True, None
    elif hasattr(spec, "__iter__"):
        raw, source, representative, labels = _concat_dicts(iter(spec), "iterable"), "iterable of dicts", True, None
    else:
        raise CalibrationError(f"cannot read {what} data from {type(spec).__name__}; give a .npz path, "
                               "a folder, 'random:N', a CalibrationDataReader or an iterable of dicts")
    arrays, fixed_batch = _check_against_model(raw, inputs, source, labels_key, what)
    if labels is not None:
        labels = _check_labels(labels, len(next(iter(arrays.values()))), labels_key or "labels", source)
    return SampleSet(arrays=arrays, source=source, representative=representative, labels=labels,
                     fixed_batch=fixed_batch, sequence_axes=sequence_axes(inputs))


# -- sources -------------------------------------------------------------------------------------
def _load_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            return {name: data[name] for name in data.files}
    except ValueError as exc:
        if "allow_pickle" in str(exc) or "Object arrays" in str(exc):
            raise CalibrationError(
                f"{path} holds a pickled object array, which onnxadmm does not load (allow_pickle=False); "
                "save numeric arrays, e.g. np.savez(path, input=x.astype(np.float32))") from None
        raise CalibrationError(f"{path} is not a readable .npz: {exc}") from None
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        raise CalibrationError(f"{path} is not a readable .npz file: {exc}") from None


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as exc:
        raise CalibrationError(f"{path}: cannot load ({exc}); pickled object arrays are not accepted") from None
    except OSError as exc:
        raise CalibrationError(f"{path} is not a readable .npy file: {exc}") from None


def _read_path(path: Path, inputs: Mapping[str, TensorType], what: str) -> dict[str, np.ndarray]:
    if not path.exists():
        raise CalibrationError(f"{what} data not found: {path}")
    if not path.is_file() and not path.is_dir():
        raise CalibrationError(f"{what} data {path} is not a regular file or a folder (a FIFO, device or socket "
                               "is never read); give a .npz, .npy or a folder of them")
    if path.is_file():
        if path.suffix == ".npy":
            return _single_input(_load_npy(path), inputs, path)
        return _load_npz(path)
    zoo = sorted(path.glob("test_data_set_*"))
    if zoo:
        return _read_model_zoo(zoo, inputs)
    files = sorted(p for p in path.iterdir() if p.suffix in (".npz", ".npy") and p.is_file())
    if not files:
        raise CalibrationError(f"folder {path} holds no .npz, .npy or test_data_set_* entries")
    parts = [_load_npz(f) if f.suffix == ".npz" else _single_input(_load_npy(f), inputs, f) for f in files]
    return _concat_dicts(iter(parts), str(path))


def _single_input(array: np.ndarray, inputs: Mapping[str, TensorType], path: Path) -> dict[str, np.ndarray]:
    if len(inputs) != 1:
        raise CalibrationError(f"{path} is a bare .npy but the model has {len(inputs)} inputs "
                               f"({', '.join(inputs)}); use a .npz keyed by input name")
    return {next(iter(inputs)): array}


def _read_model_zoo(folders: list[Path], inputs: Mapping[str, TensorType]) -> dict[str, np.ndarray]:
    """ONNX model-zoo layout: test_data_set_k/input_i.pb, one sample batch per folder."""
    names = list(inputs)
    parts = []
    for folder in folders:
        sample = {}
        for index, name in enumerate(names):
            pb = folder / f"input_{index}.pb"
            if not pb.is_file():
                raise CalibrationError(f"{folder} lacks {pb.name} for model input {name!r}")
            tensor = onnx.TensorProto()
            try:
                tensor.ParseFromString(pb.read_bytes())
            except Exception as exc:  # noqa: BLE001 - protobuf raises several types
                raise CalibrationError(f"{pb} is not a TensorProto: {exc}") from None
            sample[tensor.name or name] = numpy_helper.to_array(tensor)
        parts.append(sample)
    return _concat_dicts(iter(parts), "test_data_set_*")


def _drain_reader(reader) -> dict[str, np.ndarray]:
    parts = []
    for _ in range(1_000_000):
        item = reader.get_next()
        if item is None:
            break
        parts.append(item)
    return _concat_dicts(iter(parts), type(reader).__name__)


def _concat_dicts(parts: Iterator[Mapping[str, Any]], source: str) -> dict[str, np.ndarray]:
    collected: dict[str, list[np.ndarray]] = {}
    keys = None
    for part in parts:
        if not isinstance(part, Mapping):
            raise CalibrationError(f"{source} yielded a {type(part).__name__}; expected a dict "
                                   "{input_name: array}")
        if keys is None:
            keys = set(part)
        elif set(part) != keys:
            raise CalibrationError(f"{source}: items disagree on input names ({sorted(keys)} vs "
                                   f"{sorted(part)})")
        for name, value in part.items():
            collected.setdefault(name, []).append(np.asarray(value))
    if not collected:
        raise CalibrationError(f"{source} yielded no samples")
    try:
        return {name: np.concatenate(chunks, axis=0) for name, chunks in collected.items()}
    except ValueError as exc:
        raise CalibrationError(f"{source}: items have inconsistent shapes ({exc})") from None


def _random(spec: str, inputs: Mapping[str, TensorType], seed: int) -> dict[str, np.ndarray]:
    try:
        count = int(spec.split(":", 1)[1])
    except ValueError:
        raise CalibrationError(f"{spec!r}: random calibration is written random:N, e.g. random:64") from None
    if count < 1:
        raise CalibrationError(f"{spec!r} asks for zero samples; use random:N with N >= 1")
    rng = np.random.default_rng(seed)
    arrays = {}
    _check_random_fits(count, inputs, spec)
    for name, tensor_type in inputs.items():
        if tensor_type.shape is None or any(not isinstance(d, int) for d in tensor_type.shape[1:]):
            raise CalibrationError(f"input {name!r} has dynamic dimensions {tensor_type.shape}; random:N "
                                   "needs static shapes after the batch axis, give real data")
        if tensor_type.dtype.kind != "f":
            raise CalibrationError(f"input {name!r} is {tensor_type.dtype}; random:N only generates float "
                                   "inputs, give real data")
        shape = (count,) + tuple(tensor_type.shape[1:])
        arrays[name] = rng.standard_normal(shape).astype(tensor_type.dtype)
    return arrays


def _check_random_fits(count: int, inputs: Mapping[str, TensorType], spec: str) -> None:
    """random:N is refused (exit 2) when its arrays would take more than half the memory available now."""
    per_sample = 0
    for tensor_type in inputs.values():
        if tensor_type.shape is not None and all(isinstance(d, int) for d in tensor_type.shape[1:]):
            per_sample += int(np.prod(tensor_type.shape[1:], dtype=np.int64)) * tensor_type.dtype.itemsize
    available = available_memory_bytes()
    if available and count * per_sample > available // 2:
        most = max(1, available // 2 // max(per_sample, 1))
        raise ConfigError(f"--calib {spec} needs {count * per_sample / 2**30:.1f} GiB of samples, more than half "
                          f"the {available / 2**30:.1f} GiB available; use at most random:{most}")


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (None where it cannot be read)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


# -- checks --------------------------------------------------------------------------------------
def _check_against_model(raw: dict[str, np.ndarray], inputs: Mapping[str, TensorType], source: str,
                         labels_key: str | None, what: str) -> tuple[dict[str, np.ndarray], int | None]:
    missing = [name for name in inputs if name not in raw]
    if missing:
        raise CalibrationError(f"{what} data {source} has no array for model input {missing[0]!r} "
                               f"(it has: {', '.join(sorted(raw)) or 'nothing'}); key arrays by input name")
    extra = sorted(set(raw) - set(inputs))
    if extra:
        hint = " (pass --labels NAME if one holds labels)" if labels_key is None else ""
        raise CalibrationError(f"{what} data {source} has arrays {extra} that are not model inputs "
                               f"({', '.join(inputs)}){hint}")
    counts = set()
    fixed_batch = None
    arrays = {}
    for name, tensor_type in inputs.items():
        array = np.asarray(raw[name])
        if array.dtype == object:
            raise CalibrationError(f"input {name!r} in {source} is an object array; give numeric arrays")
        expected = tensor_type.dtype
        if array.dtype != expected:
            raise CalibrationError(f"input {name!r} in {source} has dtype {array.dtype}, the model expects "
                                   f"{expected}; convert it, e.g. x.astype(np.{expected.name})")
        shape = tensor_type.shape
        if shape is not None:
            if array.ndim == len(shape) + 1 and all(isinstance(d, int) for d in shape) and shape[0] != 1 \
                    and array.shape[1:] == tuple(shape):  # each sample is one whole input
                raise CalibrationError(
                    f"input {name!r} of the model has no batch axis: it takes one sample {_show(shape)} per "
                    f"run (as torchvision's detection models export), and onnxadmm calibrates, compares and "
                    f"times with samples stacked on axis 0. Export the model with a batch axis (for a "
                    f"detector, the backbone and heads without the box post-processing)")
            if array.ndim != len(shape):
                raise CalibrationError(
                    f"input {name!r} in {source} has shape {array.shape} (rank {array.ndim}); the model "
                    f"expects rank {len(shape)} {_show(shape)} with samples on axis 0")
            for axis in range(1, len(shape)):
                if isinstance(shape[axis], int) and array.shape[axis] != shape[axis]:
                    raise CalibrationError(
                        f"input {name!r} in {source} has shape {array.shape}; the model expects "
                        f"{_show(shape)} (axis {axis} must be {shape[axis]})")
            if isinstance(shape[0], int) and shape[0] > 0:
                fixed_batch = shape[0]
        if array.shape[0] == 0:
            raise CalibrationError(f"input {name!r} in {source} holds zero samples")
        if array.dtype.kind == "f":
            bad = ~np.isfinite(array)
            if bad.any():
                first = int(np.argwhere(bad.reshape(len(array), -1).any(axis=1))[0, 0])
                raise CalibrationError(f"input {name!r} in {source} has {int(bad.sum())} NaN/inf values "
                                       f"(first in sample {first}); clean the data")
        counts.add(array.shape[0])
        arrays[name] = np.ascontiguousarray(array)
    if len(counts) > 1:
        raise CalibrationError(f"{what} inputs in {source} have different sample counts: {sorted(counts)}")
    if fixed_batch and next(iter(counts)) % fixed_batch:
        raise CalibrationError(f"the model's batch axis is fixed at {fixed_batch} but {source} holds "
                               f"{next(iter(counts))} samples, not a multiple of it")
    return arrays, fixed_batch


def _check_labels(labels: np.ndarray, count: int, key: str, source: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1 or labels.dtype.kind not in "iu" or len(labels) != count:
        raise CalibrationError(f"labels {key!r} in {source} must be {count} integer class indices, got "
                               f"shape {labels.shape} dtype {labels.dtype}")
    return labels.astype(np.int64)


def _show(shape) -> str:
    return "[" + ", ".join(str(d) if d is not None else "?" for d in shape) + "]"
