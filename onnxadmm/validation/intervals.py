"""How far the held-out figures can be trusted: 95 % intervals for the top-1 drop and the agreement.

Top-1 drop, paired (both models run on the same N samples): with b samples only the original gets right and c
only the compressed one, the drop is d = (b − c)/N. Its interval is Agresti–Min's (2005): the paired Wald
interval after adding ½ to each cell of the 2×2 table of right/wrong outcomes,
    d̃ = (b − c)/(N + 2),   var = ((b̃ + c̃) − (b̃ − c̃)²/(N + 2)) / (N + 2)²,   b̃ = b + ½, c̃ = c + ½,
    d̃ ± z·√var, z = 1.96. It keeps close to 95 % coverage where b and c are a handful, unlike the plain Wald.
Agreement (k of N samples with the original's top-1): the Wilson score interval,
    (p̂ + z²/2N ± z·√(p̂(1 − p̂)/N + z²/4N²)) / (1 + z²/N).
A gate whose limit lies inside its figure's interval is decided by the sampling of the held-out set, not by
the model: more held-out samples would decide it.
"""

from __future__ import annotations

import math

Z_95 = 1.959963984540054


def paired_drop_interval_pt(only_original_right: int, only_compressed_right: int, samples: int
                            ) -> tuple[float, float]:
    """95 % interval of the top-1 drop in points (Agresti–Min, above)."""
    n = samples + 2
    b, c = only_original_right + 0.5, only_compressed_right + 0.5
    centre = (b - c) / n
    half = Z_95 * math.sqrt(max((b + c) - (b - c) ** 2 / n, 0.0)) / n
    return 100.0 * (centre - half), 100.0 * (centre + half)


def wilson_interval(successes: int, trials: int) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion."""
    if trials <= 0:
        return 0.0, 1.0
    p, z2 = successes / trials, Z_95 ** 2
    centre = (p + z2 / (2 * trials)) / (1 + z2 / trials)
    half = Z_95 * math.sqrt(p * (1 - p) / trials + z2 / (4 * trials ** 2)) / (1 + z2 / trials)
    return max(0.0, centre - half), min(1.0, centre + half)


def straddles(interval: tuple[float, float], limit: float) -> bool:
    """Whether ``limit`` lies strictly inside ``interval``: the gate could go either way on other samples."""
    return interval[0] < limit < interval[1]
