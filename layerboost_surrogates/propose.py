"""Surrogate proposals for the search: plans the accuracy predictor and the exact solver expect on the front.

Most proposals exploit. Before any trial has finished they spread over the predicted front (posterior mean)
at a sweep of latency budgets; after, they fill the largest gaps of the measured front (gap_fill.py: the
predicted front and the neighbours of measured front plans, picked by predicted hypervolume gain). The rest
explore: each solves the front problem for one posterior draw of the predictor at a random budget (Thompson
sampling), so plans whose quality is uncertain enough to be plausibly on the front get evaluated.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from layerboost_core.plan import LayerPlan

from .accuracy import SensitivityTable, make_predictor
from .gap_fill import gap_filling_plans
from .solver import FrontSolver, front_over_views


def propose_plans(space, cost_model, sensitivity, completed: Sequence[tuple[LayerPlan, float]], n: int, seed: int = 0,
                  *, exclude: Iterable[str] = (), metric: str = "kl", pairs: str = "adjacent",
                  latency_ceiling: float | None = None, feasible=None, kv_bytes: dict[str, float] | None = None,
                  kv_ceiling: float | None = None, explore_fraction: float = 0.25, min_trials: int = 8,
                  max_draws: int | None = None, max_loss: float | None = None, forbidden=frozenset(),
                  lost: Iterable[str] = ()) -> list[LayerPlan]:
    """Up to `n` distinct plans of `space`, none in `completed` or `exclude` (plan strings).

    `sensitivity`: rows of sensitivity.csv, {(layer, option): score} or a SensitivityTable, of `metric` --
    a lower-is-better proxy that is 0 for the original model (kl, nll_delta). `completed`: (plan, metric value)
    of finished trials. Uses the interaction predictor from `min_trials` trials on, the additive one before.
    `kv_bytes` (option -> bytes per layer, see solver.kv_per_layer) with `kv_ceiling` bounds KV memory.
    Fewer than `n` plans come back when the space has run out of unseen plans the surrogate would pick.
    `pairs` is 'adjacent' or 'none': with 'all', a 30-layer model gives the solver thousands of pair variables
    and a single solve takes minutes (use 'all' for offline accuracy studies only).
    `max_loss`: only propose where the predicted loss is at most this. The fast end of the front (most
    attention removed, KL of several nats on SmolLM2) is otherwise where a spread over latency puts most
    proposals, and no one ships those plans.
    `forbidden`: (layer, option) choices no proposal makes (e.g. those that alone lose the retrieval floor).
    `latency_ceiling` bounds `cost_model.latency`; `feasible(plan)`, any other test a proposal must pass (the
    search's ceilings predicted by its serving cost model).
    `lost`: completed plans (strings) that lost the retrieval floor. The predictor models quality alone, and the
    fast end of its front is where retrieval goes (a default run spent half its budget on neighbours of plans
    finding no fact): those plans still teach the predictor, but the gaps filled are those of the front of the
    plans that kept the floor, and no plan is proposed whose nearest evaluated plans (fewest layers changed) all
    lost it."""
    if pairs not in ("adjacent", "none"):
        raise ValueError(f"pairs: {pairs!r}; propose_plans allows adjacent or none (all pairs are too slow to solve)")
    table = SensitivityTable.of(sensitivity, space.num_layers, metric)
    predictor = make_predictor(table, [p for p, _ in completed], [v for _, v in completed], pairs, min_trials)
    rng = np.random.default_rng(seed)
    taken = {str(p) for p, _ in completed} | set(exclude)
    known = [LayerPlan.from_string(text) for text in taken]  # no-good cuts: the solver returns unseen plans only
    out: list[LayerPlan] = []
    lost = set(lost)
    kept = [(p, v) for p, v in completed if str(p) not in lost]
    lost_plans = [LayerPlan.from_string(text) for text in lost]

    def near_a_kept_plan(plan: LayerPlan) -> bool:
        if not lost_plans:
            return True
        nearest_lost = min(layers_apart(plan, q) for q in lost_plans)
        return min((layers_apart(plan, q) for q, _ in kept), default=len(plan) + 1) <= nearest_lost

    def allowed(plan: LayerPlan) -> bool:
        return (str(plan) not in taken and space.violation(plan) is None and near_a_kept_plan(plan)
                and not any((layer, option) in forbidden for layer, option in enumerate(plan.layers))
                and (latency_ceiling is None or cost_model.latency(plan) <= latency_ceiling)
                and (feasible is None or feasible(plan))
                and (kv_ceiling is None or kv_bytes is None or plan_kv(kv_bytes, plan) <= kv_ceiling))

    def take(plan: LayerPlan | None) -> None:
        if plan is not None and len(out) < n and allowed(plan):
            taken.add(str(plan))
            out.append(plan)

    # two views (the fewest and the most sequences at once) during the search: every proposal round solves the
    # front again, and its MILPs share the CPU with the evaluators
    front = [p for p, quality, _ in front_over_views(space, cost_model, predictor.terms(), 16, kv_ceiling,
                                                       latency_ceiling, known, forbidden, views=2)
             if max_loss is None or quality <= max_loss]
    exploit = n - int(round(explore_fraction * n)) if completed else n
    finite = [v for _, v in kept if np.isfinite(v)]
    if finite and exploit > 0:
        for plan in gap_filling_plans(front, kept, predictor.predict, space, cost_model,
                                      _reference(cost_model, kept, front, latency_ceiling, max_loss, finite),
                                      exploit, allowed):
            take(plan)
    elif front and exploit > 0:  # nothing measured yet: spread over the front of unseen plans, both ends included
        step = (len(front) - 1) / max(1, exploit - 1)
        for i in sorted({round(i * step) for i in range(min(exploit, len(front)))}):
            take(front[i])
    kv_layers = getattr(cost_model, "kv_layer_bytes", None) or kv_bytes
    ranges = []  # per additive view of the cost (a concurrency, and the cache budget it needs): its speed range
    for view, view_kv in cost_model.views(2):
        budgets = [b for b in (view_kv, kv_ceiling) if b is not None]
        kv_budget = min(budgets) if budgets else None
        mean = FrontSolver(space, view, predictor.terms(), kv_layers if kv_budget is not None else None, forbidden)
        fastest, best = mean.fastest(kv_budget, known), mean.solve(None, kv_budget, known)
        if fastest is not None and best is not None:
            low, high = view.latency(fastest), view.latency(best)
            if max_loss is not None and front:  # draws only where the mean front is within the loss bound
                low = max(low, min(view.latency(p) for p in front))
            ranges.append((view, kv_budget, low, max(low, high)))
    for _ in range(max_draws if max_draws is not None else 2 * n):
        if len(out) >= n or not ranges:
            break
        # one posterior draw, in one view, at a random speed budget between its fastest and best-quality plans
        view, kv_budget, low, high = ranges[int(rng.integers(len(ranges)))]
        draw = FrontSolver(space, view, predictor.terms(rng), kv_layers if kv_budget is not None else None, forbidden)
        take(draw.solve(float(rng.uniform(low, high)), kv_budget, known + out))
    for plan in front:  # draws that failed to find anything new: fill from the mean front
        take(plan)
    return out


def layers_apart(a: LayerPlan, b: LayerPlan) -> int:
    """The layers whose option differs between two plans of one model."""
    return sum(x != y for x, y in zip(a.layers, b.layers))


def plan_kv(kv_bytes: dict, plan: LayerPlan) -> float:
    """Cache bytes of `plan` from per-option bytes of one layer, or per-option lists of every layer's."""
    return sum(kv_bytes[o][i] if isinstance(kv_bytes[o], (list, tuple)) else kv_bytes[o]
               for i, o in enumerate(plan.layers))


def _reference(cost_model, completed, front, latency_ceiling, max_loss, finite) -> tuple[float, float]:
    """Reference point of the gap-filling hypervolume: the latency ceiling (else 5% beyond the slowest plan
    seen or predicted) and `max_loss` (else the worst measured loss): gaps beyond either do not count."""
    slowest = max(cost_model.latency(p) for p in [*(p for p, _ in completed), *front])
    return (latency_ceiling if latency_ceiling is not None else 1.05 * slowest,
            max_loss if max_loss is not None else max(finite))
