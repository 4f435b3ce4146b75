"""Plans enqueued before sampling: all-softmax, the LayerBoost paper's threshold heuristic, interleavings.

The paper assigns tiers from single-layer sensitivities: layers whose removal hurts least lose attention,
the next least sensitive get linear attention, the rest keep softmax. Sweeping the two thresholds gives a
family of plans (its own front), which is also the baseline the search must beat.
"""
from __future__ import annotations

from layerboost_core.plan import LayerPlan


def heuristic_plan(rows: list[dict], num_layers: int, n_none: int, n_linear: int, metric: str = "kl") -> LayerPlan:
    """Tiers by thresholds on single-swap scores: the n_none layers with lowest `none` score get none, then
    the n_linear lowest `linear` scores among the rest get linear."""
    score = {(r["layer"], r["option"]): r[metric] for r in rows}
    names = ["softmax"] * num_layers
    by_none = sorted(range(num_layers), key=lambda i: score[(i, "none")])
    for i in by_none[:n_none]:
        names[i] = "none"
    rest = sorted((i for i in range(num_layers) if names[i] == "softmax"), key=lambda i: score[(i, "linear")])
    for i in rest[:n_linear]:
        names[i] = "linear"
    return LayerPlan(tuple(names))


def heuristic_sweep(rows: list[dict], num_layers: int, count: int, metric: str = "kl") -> list[tuple[str, LayerPlan]]:
    """About `count` distinct heuristic plans from a grid of (n_none, n_linear) thresholds."""
    import math

    side = max(2, math.ceil(math.sqrt(2 * count)))
    plans: dict[str, tuple[str, LayerPlan]] = {}
    grid = sorted({round(k * num_layers / (side - 1)) for k in range(side)})
    for n_none in grid:
        for n_linear in grid:
            if n_none + n_linear <= num_layers:
                plan = heuristic_plan(rows, num_layers, n_none, n_linear, metric)
                plans.setdefault(str(plan), (f"heuristic(none={n_none},linear={n_linear})", plan))
    chosen = list(plans.values())
    if len(chosen) > count:  # keep an even spread over the sweep
        step = len(chosen) / count
        chosen = [chosen[int(k * step)] for k in range(count)]
    return chosen


def interleaved_plans(num_layers: int) -> list[tuple[str, LayerPlan]]:
    """Evenly interleaved hybrids: every k-th layer keeps softmax, the others take linear (or none)."""
    out = []
    for every in (2, 3, 4):
        for other in ("linear", "none"):
            names = ["softmax" if i % every == 0 else other for i in range(num_layers)]
            out.append((f"interleaved(softmax every {every}, else {other})", LayerPlan(tuple(names))))
    out.append(("uniform(linear)", LayerPlan.uniform("linear", num_layers)))
    return out


def seed_plans(rows: list[dict] | None, num_layers: int, heuristic_count: int = 12) -> list[tuple[str, LayerPlan]]:
    seeds = [("all-softmax", LayerPlan.uniform("softmax", num_layers))]
    if rows:
        seeds += heuristic_sweep(rows, num_layers, heuristic_count)
    seeds += interleaved_plans(num_layers)
    return seeds
