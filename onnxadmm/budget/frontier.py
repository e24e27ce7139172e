"""The search's bookkeeping: what each candidate measured, which candidates no other beats on both cost and
damage (the frontier), and which one is chosen.

cost   = latency ratio at the latency batch (``--objective latency``) or zipped-size ratio (``size``),
         compressed / original, measured in onnxruntime: lower is better;
damage = top-1 drop in points with labels, else 1 − agreement: lower is better.
The chosen candidate is the lowest-cost one that holds every gate on the evaluation data.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Candidate:
    """One configuration tried: a label and the ``CompressConfig`` fields it sets."""

    label: str
    settings: dict
    round: str = "solve"  # "solve" (no refinement) or "refine" (retried with block refinement)


@dataclass
class Measured:
    candidate: Candidate
    cost: float | None  # compressed / original (latency or zipped size); None when the run failed
    accuracy_drop_pt: float | None
    agreement: float | None
    passed: bool
    seconds: float
    note: str = ""
    chosen: bool = False
    on_frontier: bool = False
    extra: dict = field(default_factory=dict)

    @property
    def damage(self) -> float:
        if self.accuracy_drop_pt is not None:
            return self.accuracy_drop_pt
        return 100.0 * (1.0 - self.agreement) if self.agreement is not None else float("inf")

    def row(self) -> dict:
        return {"label": self.candidate.label, "settings": self.candidate.settings, "round": self.candidate.round,
                "cost_ratio": self.cost, "accuracy_drop_pt": self.accuracy_drop_pt, "agreement": self.agreement,
                "passed": self.passed, "seconds": round(self.seconds, 2), "note": self.note,
                "chosen": self.chosen, "on_frontier": self.on_frontier, **self.extra}


def frontier(measured: list[Measured]) -> list[Measured]:
    """The measured candidates no other candidate beats on both cost and damage (ties kept), by cost."""
    done = [m for m in measured if m.cost is not None]
    return sorted((m for m in done if not any(_dominates(o, m) for o in done)), key=lambda m: (m.cost, m.damage))


def _dominates(a: Measured, b: Measured) -> bool:
    return a.cost <= b.cost and a.damage <= b.damage and (a.cost < b.cost or a.damage < b.damage)


COST_TOLERANCE = 0.03  # costs within 3 % of each other are a tie (run-to-run latency noise on a shared machine)


def choose(measured: list[Measured], tolerance: float = COST_TOLERANCE) -> Measured | None:
    """The candidate that passed every gate with the lowest cost; among those within ``tolerance`` (relative)
    of that cost, the one with the least damage (a cost difference inside the noise buys nothing). None when
    no candidate passed."""
    passing = [m for m in measured if m.passed and m.cost is not None]
    if not passing:
        return None
    lowest = min(m.cost for m in passing)
    return min((m for m in passing if m.cost <= lowest * (1 + tolerance)), key=lambda m: (m.damage, m.cost))


def closest(measured: list[Measured]) -> Measured | None:
    """When none passed: the candidate with the least damage (ties: the lower cost)."""
    done = [m for m in measured if m.cost is not None]
    return min(done, key=lambda m: (m.damage, m.cost)) if done else None


def mark(measured: list[Measured], chosen: Measured | None) -> None:
    on = {id(m) for m in frontier(measured)}
    for m in measured:
        m.on_frontier, m.chosen = id(m) in on, m is chosen


