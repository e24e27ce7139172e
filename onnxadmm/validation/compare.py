"""Original vs compressed outputs on the same samples.

For every output: cosine similarity, max |a − b|, and relative error ‖a − b‖ / ‖a‖ over all samples, and
the mean over samples of each sample's cosine (what an embedding output is compared by).
For a classifier output (the first output, shape [N, C] with C > 1): top-1 agreement with the
original, and top-1 accuracy of both when labels are given (drop in percentage points), each with its 95 %
interval over the samples (``intervals.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .intervals import paired_drop_interval_pt, wilson_interval


@dataclass
class OutputDiff:
    name: str
    cosine: float
    max_abs: float
    relative_error: float
    sample_cosine: float | None = None  # mean over samples of cos(a_i, b_i); None for a scalar output


@dataclass
class Comparison:
    samples: int
    outputs: list[OutputDiff] = field(default_factory=list)
    agreement: float | None = None
    accuracy_original: float | None = None
    accuracy_compressed: float | None = None
    agreeing: int | None = None  # samples whose top-1 is the original's
    only_original_right: int | None = None  # samples only the original classifies right (with labels)
    only_compressed_right: int | None = None

    @property
    def accuracy_drop_pt(self) -> float | None:
        if self.accuracy_original is None:
            return None
        return 100.0 * (self.accuracy_original - self.accuracy_compressed)

    @property
    def accuracy_drop_interval_pt(self) -> tuple[float, float] | None:
        """95 % interval of the top-1 drop, paired over the samples."""
        if self.only_original_right is None:
            return None
        return paired_drop_interval_pt(self.only_original_right, self.only_compressed_right, self.samples)

    @property
    def agreement_interval(self) -> tuple[float, float] | None:
        return None if self.agreeing is None else wilson_interval(self.agreeing, self.samples)

    def as_dict(self) -> dict:
        return {"samples": self.samples, "agreement": self.agreement, "agreement_interval": self.agreement_interval,
                "accuracy_original": self.accuracy_original, "accuracy_compressed": self.accuracy_compressed,
                "accuracy_drop_pt": self.accuracy_drop_pt, "accuracy_drop_interval_pt": self.accuracy_drop_interval_pt,
                "only_original_right": self.only_original_right, "only_compressed_right": self.only_compressed_right,
                "outputs": [o.__dict__ for o in self.outputs]}


def mean_sample_cosine(a: np.ndarray, b: np.ndarray) -> float | None:
    """Mean over the first axis of cos(a_i, b_i) (a pair of zero vectors counts 1, one zero vector 0)."""
    if a.ndim < 2 or not a.shape[0]:
        return None
    a2, b2 = a.reshape(a.shape[0], -1).astype(np.float64), b.reshape(b.shape[0], -1).astype(np.float64)
    na, nb = np.linalg.norm(a2, axis=1), np.linalg.norm(b2, axis=1)
    both = (na > 0) & (nb > 0)
    cos = np.where(both, np.einsum("ij,ij->i", a2, b2) / np.where(both, na * nb, 1.0), (na == nb).astype(float))
    return float(cos.mean())


def compare(original: dict[str, np.ndarray], compressed: dict[str, np.ndarray],
            labels: np.ndarray | None, count: int) -> Comparison:
    result = Comparison(samples=count)
    for name, a in original.items():
        b = compressed[name]
        a64, b64 = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
        norm_a, norm_b = np.linalg.norm(a64), np.linalg.norm(b64)
        cosine = float(a64 @ b64 / (norm_a * norm_b)) if norm_a and norm_b else float(norm_a == norm_b)
        result.outputs.append(OutputDiff(
            name=name, cosine=cosine, max_abs=float(np.max(np.abs(a64 - b64))) if a64.size else 0.0,
            relative_error=float(np.linalg.norm(a64 - b64) / norm_a) if norm_a else float(np.linalg.norm(b64)),
            sample_cosine=mean_sample_cosine(a, b)))
    first = next(iter(original))
    a, b = original[first], compressed[first]
    if a.ndim == 2 and a.shape[1] > 1 and a.shape[0] == count:
        top_a, top_b = a.argmax(axis=1), b.argmax(axis=1)
        result.agreeing = int(np.sum(top_a == top_b))
        result.agreement = result.agreeing / count
        if labels is not None:
            right_a, right_b = top_a == labels, top_b == labels
            result.accuracy_original, result.accuracy_compressed = float(np.mean(right_a)), float(np.mean(right_b))
            result.only_original_right = int(np.sum(right_a & ~right_b))
            result.only_compressed_right = int(np.sum(~right_a & right_b))
    return result
