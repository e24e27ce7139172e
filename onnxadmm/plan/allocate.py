"""Allocate a global budget across layers with least predicted damage.

Each layer offers options (a level, its cost — e.g. weights kept — and predicted damage). We minimize
Σ damage subject to Σ cost ≤ budget by Lagrangian relaxation: for a price λ every layer independently
picks argmin damage + λ·cost; λ is bisected to the smallest price meeting the budget. The result lies
on the lower convex hull of each layer's curve; the slack the hull leaves is then filled greedily.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from ..errors import ConfigError


@dataclass(frozen=True)
class Option:
    level: float
    cost: float
    damage: float


def allocate(options: Mapping[str, Sequence[Option]], budget: float, what: str = "budget"
             ) -> dict[str, Option]:
    """One option per layer with Σ cost ≤ ``budget`` and least Σ damage (convex-hull optimum)."""
    cheapest = sum(min(o.cost for o in opts) for opts in options.values())
    if cheapest > budget * (1 + 1e-9):
        raise ConfigError(f"the {what} cannot be met: even the strongest compression of every layer "
                          f"costs {cheapest:.6g} > {budget:.6g}")

    def pick(price: float) -> dict[str, Option]:
        # among equal totals keep the costlier (less compressed) option: no damage is bought for nothing
        return {name: min(opts, key=lambda o: (o.damage + price * o.cost, -o.cost))
                for name, opts in options.items()}

    def total(choice: Mapping[str, Option]) -> float:
        return sum(o.cost for o in choice.values())

    free = pick(0.0)
    if total(free) <= budget:
        return free
    lo, hi = 0.0, 1.0
    while total(pick(hi)) > budget:
        hi *= 4.0
        if hi > 1e30:
            break
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if total(pick(mid)) > budget:
            lo = mid
        else:
            hi = mid
    return _fill(pick(hi), options, budget)


def _fill(choice: dict[str, Option], options: Mapping[str, Sequence[Option]], budget: float
          ) -> dict[str, Option]:
    """Spend the slack the convex hull leaves: repeatedly take the costlier option with the best
    damage reduction per unit of cost that still fits the budget."""
    choice = dict(choice)
    slack = budget - sum(o.cost for o in choice.values())
    while True:
        best = None
        for name, current in choice.items():
            for option in options[name]:
                extra = option.cost - current.cost
                gain = current.damage - option.damage
                if 0 < extra <= slack and gain > 0:
                    rate = gain / extra
                    if best is None or rate > best[0]:
                        best = (rate, name, option, extra)
        if best is None:
            return choice
        _, name, option, extra = best
        choice[name] = option
        slack -= extra
