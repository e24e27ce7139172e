"""Run the original and the compressed model through onnxruntime segment by segment.

Layers are solved in order; each needs its input (and its chain's side inputs) as computed by the
original model and by the model compressed so far. Recomputing the whole prefix per layer would cost
L full forward passes; instead each call runs only the nodes not yet computed (a segment cut out as its
own model, reading the cached frontier) — about two forward passes in total. Values are shared between
the two models until a compressed weight makes them differ. A cached tensor is dropped as soon as no
pending node or layer reads it.
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import onnx

from ..onnxio.graph import GraphView, TensorType, node_inputs
from ..onnxio.runtime import session
from ..onnxio.subgraph import cut
from .readers import SampleSet
from .store import TensorStore

ORIGINAL, COMPRESSED = "original", "compressed"


class ActivationStream:
    def __init__(self, view: GraphView, samples: SampleSet, batch_size: int, memory_budget_bytes: int,
                 threads: int = 0, keep: Callable[[str], bool] | None = None):
        self.view = view
        self.batch_size = batch_size
        self.threads = threads
        self.num_batches = samples.num_batches(batch_size)
        self.stores = {ORIGINAL: TensorStore(memory_budget_bytes // 2),
                       COMPRESSED: TensorStore(memory_budget_bytes // 2)}
        self.differs: set[str] = set()  # tensors whose compressed value differs from the original
        self.computed: set[int] = set()
        self.overrides: dict[str, np.ndarray] = {}
        self._keep = keep or (lambda name: False)
        try:  # filling may already spill; an interrupt here has no caller holding the stream to close it
            for index, batch in enumerate(samples.batches(batch_size)):
                for name, array in batch.items():
                    self.stores[ORIGINAL].put(name, index, array)
        except BaseException:
            self.close()
            raise

    # -- weights ---------------------------------------------------------------------------------
    def set_initializers(self, values: Mapping[str, np.ndarray]) -> None:
        """Compressed values of initializers, used by every segment computed from now on."""
        self.overrides.update(values)

    # -- access ----------------------------------------------------------------------------------
    def get(self, model: str, name: str, batch: int) -> np.ndarray:
        if model == COMPRESSED and name not in self.differs:
            model = ORIGINAL
        return self.stores[model].get(name, batch)

    def ensure(self, names: Iterable[str]) -> None:
        """Compute (for both models) every pending node that ``names`` depend on."""
        names = [n for n in names if n in self.view.producer]
        segment = self.view.ancestors(names, stop=self.computed) - self.computed
        if not segment:
            return
        produced = {out for i in segment for out in self.view.nodes[i].output if out}
        pending = set(range(len(self.view.nodes))) - self.computed - segment
        wanted = [t for t in sorted(produced) if t in names or self._keep(t)
                  or any(c in pending for c in self.view.consumers.get(t, []))]
        inputs = sorted({t for i in segment for t in node_inputs(self.view.nodes[i])
                         if t not in produced and t not in self.view.initializers})
        weights = {t for i in segment for t in node_inputs(self.view.nodes[i]) if t in self.overrides}
        runs = [(ORIGINAL, {})]
        if weights or any(t in self.differs for t in inputs):
            runs.append((COMPRESSED, {t: self.overrides[t] for t in weights}))
        for model_name, values in runs:
            types = {t: observed_type([self.get(model_name, t, b) for b in range(self.num_batches)])
                     for t in inputs}
            model = cut(self.view, segment, wanted, types, values)
            sess = session(model, self.threads, arena=False)  # its peak is not kept beside the solve
            for batch in range(self.num_batches):
                feed = {t: np.asarray(self.get(model_name, t, batch)) for t in inputs}
                outputs = sess.run(wanted, feed)
                for name, value in zip(wanted, outputs):
                    self.stores[model_name].put(name, batch, value)
        if len(runs) == 2:
            self.differs.update(wanted)
        self.computed |= segment
        self.evict()

    def evict(self) -> None:
        """Drop cached tensors no pending node reads and no pending layer needs."""
        pending = set(range(len(self.view.nodes))) - self.computed
        for store in self.stores.values():
            for name in list(store.names()):
                if self._keep(name):
                    continue
                if not any(c in pending for c in self.view.consumers.get(name, [])):
                    store.drop(name)
                    self.differs.discard(name)

    @property
    def peak_bytes(self) -> int:
        return sum(store.peak_bytes for store in self.stores.values())

    @property
    def spilled_bytes(self) -> int:
        return sum(store.spilled_bytes for store in self.stores.values())

    def close(self) -> None:
        for store in self.stores.values():
            store.close()


def observed_type(arrays: Sequence[np.ndarray]) -> TensorType:
    """The type of a segment input fed ``arrays`` (one per batch): their dtype, and their shape with an axis
    whose size differs between them (a smaller last batch) left symbolic. A declared shape matters: a Resize
    whose target size is computed from a segment input needs that input's length known when the segment is
    loaded."""
    shapes = [np.shape(a) for a in arrays]
    dtype = onnx.helper.np_dtype_to_tensor_dtype(np.asarray(arrays[0]).dtype)
    if len({len(shape) for shape in shapes}) != 1:
        return TensorType(dtype, None)
    dims: list[int | str] = []
    for axis in range(len(shapes[0])):
        sizes = {shape[axis] for shape in shapes}
        dims.append(sizes.pop() if len(sizes) == 1 else f"onnxadmm_axis{axis}")
    return TensorType(dtype, tuple(dims))
