"""Proposals that fill the gaps of the measured front.

The finished trials draw a staircase: the measured front of quality loss against predicted latency. A new
plan is worth an evaluation by the area it would add below that staircase (its hypervolume gain) if the
predictor is right. Candidates come from two places: the solver's predicted front (plans possibly far from
anything measured) and the neighbourhood of the measured front plans -- one layer changed, or one layer made
cheaper while another is made dearer -- where the predictor, fitted on those very plans, is most accurate.
Picks are greedy: each is added to the staircase at its predicted point, so the next one goes to another gap
instead of crowding the same one.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from layerboost_core.pareto import front_indices, hypervolume_2d
from layerboost_core.plan import LayerPlan

MAX_SCORED = 600  # candidates whose exact gain is computed (the rest: smaller margin below the staircase)
MAX_POOL = 60_000  # neighbours per call (30 layers stay below it: a whole proposal takes 1-4 s); deeper models stop at the largest gaps


def local_moves(plan: LayerPlan, options: Sequence[str], pinned: dict[int, str],
                seconds: dict[str, float]) -> list[LayerPlan]:
    """Plans one step from `plan`: every single-layer change, and every exchange of one layer to a cheaper
    option with another to a dearer one (about the same latency, different quality). Pinned layers stay."""
    layers = list(plan.layers)
    free = [i for i in range(len(layers)) if i not in pinned]
    cheaper = [(i, o) for i in free for o in options if seconds[o] < seconds[layers[i]]]
    dearer = [(i, o) for i in free for o in options if seconds[o] > seconds[layers[i]]]
    out = []
    for i, o in cheaper + dearer:
        out.append(LayerPlan(tuple(layers[:i] + [o] + layers[i + 1:])))
    for i, o in cheaper:
        for j, p in dearer:
            if i != j:
                changed = list(layers)
                changed[i], changed[j] = o, p
                out.append(LayerPlan(tuple(changed)))
    return out


def by_adjacent_gap(points: list[tuple[float, float]]) -> list[int]:
    """Indices of front `points` (sorted by latency) by the area of the larger gap next to them: the
    rectangle between a point and its neighbour on the staircase. The two ends come first (the front can
    grow past them)."""
    def gap(i: int, j: int) -> float:
        return (points[j][0] - points[i][0]) * (points[i][1] - points[j][1])

    last = len(points) - 1
    size = [float("inf") if i in (0, last) else max(gap(i - 1, i), gap(i, i + 1)) for i in range(len(points))]
    return sorted(range(len(points)), key=lambda i: -size[i])


def staircase_values(front: list[tuple[float, float]], xs: np.ndarray, ceiling: float) -> np.ndarray:
    """The best measured quality at latency <= x for each x, or `ceiling` where no front point is that fast.
    `front`: non-dominated points sorted by latency, so quality falls along it and the last point at or
    before x is the best."""
    if not front:
        return np.full(len(xs), ceiling)
    fx, fy = np.array([x for x, _ in front]), np.minimum(np.array([y for _, y in front]), ceiling)
    at = np.searchsorted(fx, xs, side="right") - 1
    return np.where(at >= 0, fy[np.maximum(at, 0)], ceiling)


def pick_by_front_gain(latencies: np.ndarray, predicted: np.ndarray, measured: list[tuple[float, float]],
                       reference: tuple[float, float], n: int) -> list[int]:
    """Indices of up to `n` candidates, greedily by hypervolume gain of their predicted point over the
    measured points plus the picks so far. Candidates predicted to add nothing are never picked."""
    points = [measured[i] for i in front_indices(measured)]
    margin = np.where(latencies < reference[0], staircase_values(points, latencies, reference[1]) - predicted, -np.inf)
    scored = [int(i) for i in np.argsort(-margin)[:MAX_SCORED] if margin[i] > 0]
    picks: list[int] = []
    current = hypervolume_2d(points, reference)
    for _ in range(n):
        best, best_gain = None, 0.0
        for i in scored:
            gain = hypervolume_2d(points + [(latencies[i], predicted[i])], reference) - current
            if gain > best_gain:
                best, best_gain = i, gain
        if best is None:
            break
        picks.append(best)
        scored.remove(best)
        points = [*points, (float(latencies[best]), float(predicted[best]))]
        current += best_gain
    return picks


def gap_filling_plans(front_candidates: Sequence[LayerPlan], completed: Sequence[tuple[LayerPlan, float]],
                      predict: Callable[[list[LayerPlan]], tuple[np.ndarray, np.ndarray]], space, cost_model,
                      reference: tuple[float, float], n: int, allowed: Callable[[LayerPlan], bool],
                      optimism: float = 1.0) -> list[LayerPlan]:
    """Up to `n` plans (allowed, unseen) expected to add the most area below the measured front.

    `predict` returns (mean, variance) of the quality loss; a candidate's predicted point is
    max(mean - optimism * sd, 0): optimism in the face of uncertainty, so a plan the predictor is unsure about
    but that could fill a gap gets its chance."""
    finished = [(p, float(v)) for p, v in completed if np.isfinite(v)]
    measured = [(cost_model.latency(p), v) for p, v in finished]
    front = [i for i in front_indices(measured) if measured[i][1] < reference[1]]
    pool: dict[str, LayerPlan] = {str(p): p for p in front_candidates}
    for k in by_adjacent_gap([measured[i] for i in front]):
        if len(pool) >= MAX_POOL:
            break
        for moved in local_moves(finished[front[k]][0], space.options, space.pinned, cost_model.per_layer_seconds):
            pool.setdefault(str(moved), moved)
    candidates = [p for p in pool.values() if allowed(p)]
    if not candidates:
        return []
    mean, variance = predict(candidates)
    optimistic = np.maximum(mean - optimism * np.sqrt(np.maximum(variance, 0.0)), 0.0)
    latencies = np.array([cost_model.latency(p) for p in candidates])
    return [candidates[i] for i in pick_by_front_gain(latencies, optimistic, measured, reference, n)]
