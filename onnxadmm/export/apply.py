"""Write the solved weights into (a copy of) the original graph and check the result.

Only initializer values change here: same nodes, same input/output names, dtypes, dynamic axes, opset
and ir_version. The model is stamped with ``onnxadmm.*`` metadata and must pass onnx.checker's full
check (with strict shape inference), as the normalized input did.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import OnnxAdmmError
from ..onnxio.load import full_check
from ..onnxio.save import stamp_metadata, without_initializers
from ..onnxio.weights import stub_for


def apply_initializers(model: onnx.ModelProto, values: dict[str, np.ndarray],
                       consume: bool = False) -> onnx.ModelProto:
    """A copy of ``model`` whose initializers named in ``values`` hold the new arrays (same dtype; an array kept in
    a weight file is referred to, not copied: ``onnxio/weights.py``). With
    ``consume``, each array is removed from ``values`` once written, so the solved weights and the copy are not
    both held whole (a large model's solve ends holding every solved weight)."""
    out = without_initializers(model)  # then each initializer once: new ones are not copied twice
    shapes = {name: np.shape(array) for name, array in values.items()}
    replaced = set()
    for tensor in model.graph.initializer:
        if tensor.name in shapes:
            dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
            array = values.pop(tensor.name) if consume else values[tensor.name]
            out.graph.initializer.append(stub_for(tensor.name, array, tensor.data_type)
                                         or numpy_helper.from_array(np.asarray(array).astype(dtype), tensor.name))
            del array
            replaced.add(tensor.name)
        else:
            out.graph.initializer.append(tensor)
    missing = set(shapes) - replaced
    if missing:
        raise OnnxAdmmError(f"internal error: initializers {sorted(missing)} not found in the graph")
    for value in out.graph.input:  # keep declared shapes of overridable initializers consistent
        if value.name in shapes and value.type.tensor_type.HasField("shape"):
            dims = value.type.tensor_type.shape.dim
            shape = shapes[value.name]
            if len(dims) != len(shape) or any(d.dim_value != s for d, s in zip(dims, shape)):
                value.type.tensor_type.ClearField("shape")
                value.type.tensor_type.shape.dim.extend(
                    onnx.TensorShapeProto.Dimension(dim_value=s) for s in shape)
    return out


def write_initializers(graph: onnx.GraphProto, values: Mapping[str, np.ndarray]) -> None:
    """Replace or add the initializers in ``values``, then drop initializers nothing reads any more."""
    existing = {t.name: i for i, t in enumerate(graph.initializer)}
    for name, array in values.items():
        tensor = stub_for(name, array) or numpy_helper.from_array(np.ascontiguousarray(array), name)
        if name in existing:
            graph.initializer[existing[name]].CopyFrom(tensor)
        else:
            graph.initializer.append(tensor)
    used = {n for node in graph.node for n in node.input} | {v.name for v in graph.output}
    for tensor in [t for t in graph.initializer if t.name not in used]:
        graph.initializer.remove(tensor)


def finalize(model: onnx.ModelProto, source: onnx.ModelProto, metadata: Mapping[str, str]) -> list[str]:
    """Stamp metadata and run the full check; returns notes for the report. A failure is an error in
    onnxadmm (the normalized input passed the same check), raised as such."""
    stamp_metadata(model, metadata)
    problem = full_check(model)
    if problem:  # the input passed it (``normalize`` refuses or repairs one that does not)
        raise OnnxAdmmError(f"internal error: the compressed model fails onnx.checker ({problem})")
    return []
