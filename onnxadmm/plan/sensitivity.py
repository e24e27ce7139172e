"""Per-layer sensitivity, measured in onnxruntime on a few calibration samples.

Curve shape (cheap, per layer): removing the entries with the smallest score s_j = w_j²·E[x_j²]
(the output energy each weight carries, x_j its input feature) costs about
    e(s) = Σ_{smallest fraction s of scores} s_j / Σ_j s_j.
Scale (measured): prune the layer alone at a probe level, run the whole model, and take the relative
change of the model outputs D = ‖f − f₀‖² / ‖f₀‖². The predicted damage of level s is α·e(s) with
α = D / e(probe). A probe's weights are fed to a session as inputs; in a model under 64 MB that session runs
only the nodes from the first one reading them on, fed the original's tensors that cross there.
"""

from __future__ import annotations


import numpy as np
import onnx

from ..analysis.layers import Layer
from ..calib.readers import SampleSet
from ..calib.stream import observed_type
from ..onnxio.graph import GraphView
from ..onnxio.runtime import session, session_with_inputs, session_with_outputs, through_files
from ..onnxio.subgraph import cut


def input_second_moments(view: GraphView, layers: list[Layer], samples: SampleSet, batch_size: int,
                         threads: int) -> dict[str, np.ndarray]:
    """E[x_j²] for every canonical input entry j of each layer, shape (G, d)."""
    names = sorted({layer.input_name for layer in layers})
    sess = session_with_outputs(view.model, names, threads, arena=False)
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for batch in samples.batches(batch_size):
        for name, value in zip(names, sess.run(names, batch)):
            layer = next(l for l in layers if l.input_name == name)
            axis = 1 if layer.op_type == "Conv" else value.ndim - 1
            parts = [value[i:i + 1] for i in range(len(value))] if value.ndim > 1 else [value]
            for part in parts:  # float64 one sample at a time, not a float64 copy of the whole batch
                part = np.asarray(part, dtype=np.float64)
                moved = np.moveaxis(part, axis, -1).reshape(-1, part.shape[axis])
                sums[name] = sums.get(name, 0.0) + (moved ** 2).sum(axis=0)
                counts[name] = counts.get(name, 0) + moved.shape[0]
    result = {}
    for layer in layers:
        per_channel = sums[layer.input_name] / max(counts[layer.input_name], 1)
        taps = layer.in_features * layer.groups // per_channel.shape[0]
        result[layer.name] = np.repeat(per_channel, taps).reshape(layer.groups, layer.in_features)
    return result


def entry_scores(w_canonical: np.ndarray, second_moment: np.ndarray) -> np.ndarray:
    """s_j = w_j²·E[x_j²], same shape as the canonical weight (G, R, d)."""
    return (w_canonical.astype(np.float64) ** 2) * second_moment[:, None, :]


def error_curve(scores: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """e(s) for each sparsity in ``levels``: the share of Σ scores carried by the removed entries."""
    flat = np.sort(scores.reshape(-1))
    cumulative = np.concatenate([[0.0], np.cumsum(flat)])
    removed = np.round(levels * flat.size).astype(int)
    total = cumulative[-1] or 1.0
    return cumulative[removed] / total


def prune_by_score(w_canonical: np.ndarray, scores: np.ndarray, sparsity: float) -> np.ndarray:
    """Zero the fraction ``sparsity`` of entries with the smallest score."""
    flat = scores.reshape(-1)
    removed = int(round(sparsity * flat.size))
    order = np.argsort(flat, kind="stable")[:removed]
    pruned = w_canonical.copy().reshape(-1)
    pruned[order] = 0.0
    return pruned.reshape(w_canonical.shape)


def output_damage(view: GraphView, probes: dict, samples: SampleSet, batch_size: int, threads: int,
                  logits_kl: bool = False) -> dict:
    """For each probe (key -> {initializer: value}), ‖f − f₀‖² / ‖f₀‖² over the model outputs.

    ``logits_kl``: an output of shape (N, K ≥ 2) is read as class scores and judged by the mean
    KL(softmax f₀ ‖ softmax f) instead (the other outputs keep the relative squared error). The squared
    error over all K scores is dominated by the many classes that never win: EfficientNet-Lite0's
    classifier kept at rank 162 changes it by 0.30 and top-1 from 88.4 to 76.0 %, at 29 % of its entries
    by 0.71 and top-1 86.6 % — the KL orders them as top-1 does (0.95 and 0.16).

    onnxruntime does not pre-pack a weight it is fed as an input, so a session where every probed weight can
    be fed runs the whole model slower (docs/SCALE.md). Models below ``runtime.FILES_FROM_BYTES`` get a session
    per set of probed weights instead (one at a time: a layer's probes share it), running the graph from that
    set's first reader on (``_suffix_runs``); larger ones, whose sessions cost more to build, one session of the
    whole graph for every probe. Outputs computed before a probe's weights are read are unchanged by it."""
    batches = list(samples.batches(batch_size))
    plain = session(view.model, threads, arena=False) if not through_files(view.model) else None
    reference = outputs = scores = None
    energy = count = 1.0
    damage = {}
    runs = _suffix_runs(view, probes, batches, threads) if plain else \
        [(_overridable(view, sorted({n for values in probes.values() for n in values}), threads), list(probes),
          batches)]
    for sess, keys, feeds in runs:
        if reference is None:
            whole = plain or sess
            outputs = [o.name for o in whole.get_outputs()]
            reference = [[np.asarray(r, np.float64) for r in whole.run(outputs, batch)] for batch in batches]
            scores = [logits_kl and r.ndim == 2 and r.shape[1] >= 2 for r in (reference[0] if reference else [])]
            energy = sum(float(np.sum(r ** 2)) for ref in reference for r, kl in zip(ref, scores) if not kl) or 1.0
            count = sum(len(ref[0]) for ref in reference) or 1
        computed = [o.name for o in sess.get_outputs()] if sess is not None else []
        for key in keys:
            squared = divergence = 0.0
            for feed, ref in zip(feeds, reference):
                got = dict(zip(computed, sess.run(computed, {**feed, **probes[key]})))
                for name, r, kl in zip(outputs, ref, scores):
                    if name not in got:
                        continue
                    g = got[name]
                    if kl:
                        divergence += float(np.sum(_kl_rows(r, np.asarray(g, np.float64))))
                    else:
                        squared += float(np.sum((np.asarray(g, np.float64) - r) ** 2))
            damage[key] = squared / energy + divergence / count
    return {key: damage[key] for key in probes}


def _suffix_runs(view: GraphView, probes: dict, batches: list[dict], threads: int):
    """(session, probe keys, its feed per batch) for each set of probed weights, in graph order: the session runs
    the nodes from the set's first reader on, with those weights as inputs, fed the original's tensors that
    cross that cut — computed segment by segment from one cut to the next (one forward pass in all, holding one
    cut's tensors at a time)."""
    position = {node: k for k, node in enumerate(view.order)}
    sets: dict[tuple[str, ...], list] = {}
    for key, values in probes.items():
        sets.setdefault(tuple(sorted(values)), []).append(key)

    def first_reader(names) -> int:
        return min((position[c] for name in names for c in view.consumers.get(name, [])), default=0)

    state, start = [dict(batch) for batch in batches], 0  # the tensors crossing the cut at ``start``, per batch
    for names, keys in sorted(sets.items(), key=lambda item: first_reader(item[0])):
        at = first_reader(names)
        crossing = _crossing(view, position, at)
        produced = [t for t in crossing if t in view.producer and position[view.producer[t]] >= start]
        types = {t: observed_type([values[t] for values in state]) for t in state[0]} if state else {}
        if produced and state:
            segment = session(cut(view, view.order[start:at], produced, types), threads, arena=False)
            wanted = [i.name for i in segment.get_inputs()]
            for values in state:
                values.update(zip(produced, segment.run(produced, {t: values[t] for t in wanted})))
        state, start = [{t: values[t] for t in crossing} for values in state], at
        later = [o for o in view.output_names if o in view.producer and position[view.producer[o]] >= at]
        if not later:  # every output is computed before these weights are read
            yield None, keys, []
            continue
        types = {t: observed_type([values[t] for values in state]) for t in state[0]} if state else {}
        sess = _overridable(view, list(names), threads, cut(view, view.order[at:], later, types))
        wanted = {i.name for i in sess.get_inputs()} - set(names)
        yield sess, keys, [{t: values[t] for t in values if t in wanted} for values in state]


def _crossing(view: GraphView, position: dict[int, int], at: int) -> list[str]:
    """Tensors a node at or after position ``at`` reads that a node before it (or the caller) provides."""
    return sorted(t for t, readers in view.consumers.items()
                  if t and t not in view.initializers and any(position[r] >= at for r in readers)
                  and (t not in view.producer or position[view.producer[t]] < at))


def _overridable(view: GraphView, names: list[str], threads: int, model: onnx.ModelProto | None = None):
    return session_with_inputs(view.model if model is None else model, [onnx.helper.make_tensor_value_info(
        name, view.initializers[name].data_type, view.initializers[name].dims) for name in names], threads,
        arena=False)


def _kl_rows(reference: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """KL(softmax reference ‖ softmax scores) per row."""
    log_p = reference - reference.max(1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(1, keepdims=True))
    log_q = scores - scores.max(1, keepdims=True)
    log_q -= np.log(np.exp(log_q).sum(1, keepdims=True))
    return (np.exp(log_p) * (log_p - log_q)).sum(1)
