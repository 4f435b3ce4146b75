"""Pareto helpers (every objective minimised): the front of a point set and its hypervolume in 2 or 3 objectives."""
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


def hypervolume_3d(points, reference) -> float:
    """Volume dominated by `points` (three objectives minimised) inside the box up to `reference`: slices along
    the third objective, each the 2-D area of the points at or below it (exact; O(n^2 log n), for fronts of a
    few hundred points)."""
    inside = sorted((p for p in points if all(v < r for v, r in zip(p, reference))), key=lambda p: p[2])
    volume = 0.0
    for i, point in enumerate(inside):
        top = inside[i + 1][2] if i + 1 < len(inside) else reference[2]
        if top > point[2]:
            volume += (top - point[2]) * hypervolume_2d([(x, y) for x, y, _ in inside[: i + 1]], reference[:2])
    return volume


def non_dominated(points: Sequence[tuple[float, ...]]) -> list[int]:
    """Indices of the points no other point dominates (every objective minimised; equal points all kept)."""
    def dominates(a, b) -> bool:
        return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))

    return [i for i, p in enumerate(points) if not any(dominates(q, p) for j, q in enumerate(points) if j != i)]
