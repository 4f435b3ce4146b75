"""Two-objective Pareto helpers (both objectives minimised): the front of a point set and its hypervolume."""
from __future__ import annotations

from typing import Sequence


def hypervolume_2d(points, reference) -> float:
    """Area dominated by `points` (both objectives minimised) inside the box up to `reference`."""
    inside = sorted((x, y) for x, y in points if x < reference[0] and y < reference[1])
    # sweep over x: for each x, the best (lowest) y achieved by points with x' <= x
    xs = [x for x, _ in inside] + [reference[0]]
    area, best = 0.0, reference[1]
    for (x, y), x_next in zip(inside, xs[1:]):
        best = min(best, y)
        area += (x_next - x) * (reference[1] - best)
    return area


def front_indices(points: Sequence[tuple[float, float]], tolerance: float = 1e-12) -> list[int]:
    """Indices of the non-dominated points, sorted by the first objective (ties: the better second one).
    A point must improve the second objective by more than `tolerance` to count (rounding is not a gain)."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    out, best = [], float("inf")
    for i in order:
        if points[i][1] < best - tolerance:
            out.append(i)
            best = points[i][1]
    return out
