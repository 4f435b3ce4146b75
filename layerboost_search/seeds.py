"""Plans enqueued before sampling: all-softmax, the additive front, the retrieval-ranked tiers, the paper's
threshold heuristic, interleavings.

The paper assigns tiers from single-layer sensitivities: layers whose removal hurts least lose attention,
the next least sensitive get linear attention, the rest keep softmax. Sweeping the two thresholds gives a
family of plans (its own front), which is also the baseline the search must beat.

The additive front uses the same table but also the cost model: for a sweep of speed budgets, the plan whose
summed single-swap scores are least (an exact MILP, layerboost_surrogates.solver, in each additive view of the
serving cost: a concurrency and the cache budget that lets it fit). Thresholds ignore what each option saves in
time and memory; the solver does not, so these plans come first.

Retrieval is not additive: it lives in a few layers, and swapping one of them alone already loses it (on
SmolLM2 at 2,048 tokens, layer 18 to `linear` finds 1 of 48 facts, layer 7 23 of 48, while most single swaps
keep all of them). Those (layer, option) choices are `retrieval_critical`; no seed makes them (a seed that
would is kept with those layers softmax), and the surrogate proposes none, so the search spends its budget
making the other layers cheap.
"""
from __future__ import annotations

import math

from layerboost_core.plan import LayerPlan


def heuristic_plan(rows: list[dict], num_layers: int, n_none: int, n_linear: int, metric: str = "kl",
                   middle: str | None = "linear") -> LayerPlan:
    """Tiers by thresholds on single-swap scores: the n_none layers with lowest `none` score get none, then
    the n_linear lowest `middle` scores among the rest get `middle` (the paper's `linear`; another option
    where the space has no `linear`, none where it has no middle tier)."""
    score = {(r["layer"], r["option"]): r[metric] for r in rows}
    names = ["softmax"] * num_layers
    by_none = sorted(range(num_layers), key=lambda i: score[(i, "none")])
    for i in by_none[:n_none]:
        names[i] = "none"
    if middle is not None:
        rest = sorted((i for i in range(num_layers) if names[i] == "softmax"), key=lambda i: score[(i, middle)])
        for i in rest[:n_linear]:
            names[i] = middle
    return LayerPlan(tuple(names))


def middle_tier(options) -> str | None:
    """The option of the heuristic's middle tier among `options` (those scored in the sensitivity rows): the
    paper's `linear`, else the first other replacement (e.g. `mixed1` where `linear` was narrowed away)."""
    others = [o for o in options if o not in ("softmax", "none")]
    return "linear" if "linear" in others else (others[0] if others else None)


def heuristic_sweep(rows: list[dict], num_layers: int, count: int, metric: str = "kl") -> list[tuple[str, LayerPlan]]:
    """About `count` distinct heuristic plans from a grid of (n_none, n_middle) thresholds (see middle_tier)."""
    middle = middle_tier(dict.fromkeys(r["option"] for r in rows))
    side = max(2, math.ceil(math.sqrt(2 * count)))
    plans: dict[str, tuple[str, LayerPlan]] = {}
    grid = sorted({round(k * num_layers / (side - 1)) for k in range(side)})
    for n_none in grid:
        for n_linear in grid if middle is not None else [0]:
            if n_none + n_linear <= num_layers:
                plan = heuristic_plan(rows, num_layers, n_none, n_linear, metric, middle)
                plans.setdefault(str(plan), (f"heuristic(none={n_none},{middle}={n_linear})", plan))
    chosen = list(plans.values())
    if len(chosen) > count:  # keep an even spread over the sweep
        step = len(chosen) / count
        chosen = [chosen[int(k * step)] for k in range(count)]
    return chosen


# Plans predicted to lose more than this (nats/token of KL or NLL) are not seeded: on SmolLM2 the additive
# front beyond it is plans with most attention removed (measured KL 4-8), which no one ships. The search
# itself still explores there.
MAX_SEEDED_LOSS = 1.0


def retrieval_critical(rows: list[dict], floor: float | None, facts: int = 0) -> frozenset:
    """The (layer, option) choices whose single swap alone keeps less retrieval_acc than `floor` (sensitivity
    rows with retrieval metrics), for certain over the proxy's `facts` facts (objectives.retrieval_shortfall);
    empty without a floor."""
    from .objectives import retrieval_shortfall

    if floor is None:
        return frozenset()
    return frozenset((int(r["layer"]), str(r["option"])) for r in rows
                     if r.get("retrieval_acc") is not None and retrieval_shortfall(r["retrieval_acc"], facts, floor) > 0)


def without(plan: LayerPlan, critical) -> LayerPlan:
    """`plan` with every critical (layer, option) choice set back to softmax."""
    return LayerPlan(tuple("softmax" if (i, o) in critical else o for i, o in enumerate(plan.layers)))


def additive_front_plans(rows: list[dict], space, cost, count: int, metric: str = "kl",
                         max_loss: float = MAX_SEEDED_LOSS, critical=frozenset()) -> list[tuple[str, LayerPlan]]:
    """Up to `count` plans of the exact front of summed single-swap scores vs predicted latency, predicted
    loss at most `max_loss`, spread evenly in log(predicted loss): loss matters on a log scale (0.01 vs 0.1
    nats is as different as 0.1 vs 1), and an even spread in latency would spend most seeds on plans too
    damaged to ship. (On SmolLM2 the prediction is close where it matters: 0.087 -> 0.109, 0.037 -> 0.041.)"""
    from layerboost_surrogates.accuracy import AdditivePredictor, SensitivityTable
    from layerboost_surrogates.solver import front_over_views

    table = SensitivityTable.of(rows, space.num_layers, metric)
    front = front_over_views(space, cost, AdditivePredictor(table).terms(), 6 * count, forbidden=critical)
    front = [(plan, quality) for plan, quality, _ in front if 0 < quality <= max_loss]  # all-softmax: own seed
    if len(front) <= count:
        chosen = front
    else:
        logs = [math.log(q) for _, q in front]
        targets = [logs[0] + k * (logs[-1] - logs[0]) / (count - 1) for k in range(count)] if count > 1 else [logs[0]]
        picked = sorted({min(range(len(front)), key=lambda i: abs(logs[i] - t)) for t in targets})
        chosen = [front[i] for i in picked]
    return [(f"additive-front(predicted {metric} {quality:.3g})", plan) for plan, quality in chosen]


# Shares of the layers kept softmax by the retrieval-ranked seeds: on SmolLM2 at 512+256 tokens the plans the
# KL-driven search offered kept about half (15 of 30, 1.4-1.5x the original's output tokens/s), and plans keeping
# a third or less serve 2x and more when they keep retrieval.
RETRIEVAL_RANKED_SHARES = (0.2, 0.27, 0.3, 0.33, 0.37, 0.4)


def retrieval_ranked_plans(rows: list[dict], num_layers: int, shares=RETRIEVAL_RANKED_SHARES) -> list[tuple[str, LayerPlan]]:
    """The paper's tiers ranked by retrieval instead of KL: softmax at the k layers whose single swap to the
    middle tier (middle_tier: `linear` where searched) raises the proxy's retrieval NLL most, the middle tier
    elsewhere, for k = each share of the layers. Retrieval is the floor plans fail at the confirmation rung, and
    the KL ranking puts its layers in no particular place; the retrieval NLL is continuous where 16 facts'
    accuracy is not (most single swaps find all 16). Empty without retrieval metrics."""
    middle = middle_tier(dict.fromkeys(r["option"] for r in rows))
    score = {r["layer"]: r.get("retrieval_nll") for r in rows if r["option"] == middle}
    if middle is None or len(score) < num_layers or any(v is None for v in score.values()):
        return []
    ranked = sorted(range(num_layers), key=lambda i: -score[i])  # most retrieval lost first
    out = []
    for k in sorted({max(1, round(share * num_layers)) for share in shares}):
        kept = set(ranked[:k])
        plan = LayerPlan(tuple("softmax" if i in kept else middle for i in range(num_layers)))
        out.append((f"retrieval-ranked(softmax at the {k} layers whose {middle} swap loses most retrieval)", plan))
    return out


def interleaved_plans(num_layers: int) -> list[tuple[str, LayerPlan]]:
    """Evenly interleaved hybrids: every k-th layer keeps softmax, the others take linear. (Interleaving
    with `none` measured KL 3-8 nats on SmolLM2: seeds the search never needed.)"""
    out = []
    for every in (2, 3, 4):
        names = ["softmax" if i % every == 0 else "linear" for i in range(num_layers)]
        out.append((f"interleaved(softmax every {every}, else linear)", LayerPlan(tuple(names))))
    out.append(("uniform(linear)", LayerPlan.uniform("linear", num_layers)))
    return out


def seed_plans(rows: list[dict] | None, num_layers: int, heuristic_count: int = 12, *, space=None, cost=None,
               front_count: int = 10, critical=frozenset()) -> list[tuple[str, LayerPlan]]:
    """All-softmax, then (with a sensitivity table) the additive front (needs `space` and `cost`), the
    retrieval-ranked tiers and the heuristic sweep, then the interleavings, in that order: the study evaluates
    them first to last. A seed making a `critical` choice (retrieval_critical) keeps that layer softmax instead
    (its label says so)."""
    seeds = [("all-softmax", LayerPlan.uniform("softmax", num_layers))]
    if rows and space is not None and cost is not None and front_count > 0:
        seeds += additive_front_plans(rows, space, cost, front_count, critical=critical)
    if rows:
        seeds += retrieval_ranked_plans(rows, num_layers)
        seeds += heuristic_sweep(rows, num_layers, heuristic_count)
    seeds += interleaved_plans(num_layers)
    kept = []
    for label, plan in seeds:
        safe = without(plan, critical)
        kept.append((label if safe == plan else f"{label}, retrieval layers kept", safe))
    return kept
