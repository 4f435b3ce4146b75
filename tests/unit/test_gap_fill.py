"""Gap-filling proposals: Pareto helpers, local moves and greedy picks by hypervolume gain, on small known
geometries and on an 8-layer space whose quality is known exactly."""
from __future__ import annotations

import numpy as np
import pytest

from layerboost_core.pareto import front_indices, hypervolume_2d
from layerboost_core.plan import LayerPlan
from layerboost_core.space import SearchSpace
from layerboost_surrogates.cost_model import AdditiveCostModel
from layerboost_surrogates.gap_fill import (by_adjacent_gap, gap_filling_plans, local_moves, pick_by_front_gain,
                                            staircase_values)

OPTIONS = ("softmax", "linear", "none")
L = 8
SECONDS = {"softmax": 0.02, "linear": 0.0085, "none": 0.0}
COST = AdditiveCostModel(base_seconds=0.1, per_layer_seconds=SECONDS, uniform_seconds={}, workload={},
                         device="test", settings={"num_layers": L})


def test_front_indices_keeps_the_non_dominated_points_by_first_objective():
    points = [(3.0, 1.0), (1.0, 3.0), (2.0, 2.0), (2.5, 2.5), (1.0, 4.0), (4.0, 1.0)]
    assert front_indices(points) == [1, 2, 0]


def test_picks_fill_the_largest_gap_first_and_never_a_dominated_point():
    measured = [(1.0, 3.0), (3.0, 1.0)]
    reference = (4.0, 4.0)
    # 0: middle of the big gap (gain 1), 1: small gap at the slow end (gain 0.25), 2: dominated by (1, 3),
    # 3: next to 0 (gain 0.9 alone, 0 once 0 is picked)
    latencies = np.array([2.0, 3.5, 2.0, 2.0])
    predicted = np.array([2.0, 0.5, 3.5, 2.1])
    assert pick_by_front_gain(latencies, predicted, measured, reference, 4) == [0, 1]
    assert pick_by_front_gain(latencies, predicted, measured, reference, 1) == [0]
    assert pick_by_front_gain(latencies, predicted, measured, (1.5, 4.0), 4) == []  # beyond the reference


def test_local_moves_change_one_layer_or_exchange_a_cheaper_for_a_dearer_one_and_keep_pinned_layers():
    plan = LayerPlan(("softmax", "linear", "none", "softmax"))
    moves = local_moves(plan, OPTIONS, {0: "softmax"}, SECONDS)
    texts = {str(m) for m in moves}
    assert len(texts) == len(moves) and str(plan) not in texts
    singles = [m for m in moves if sum(a != b for a, b in zip(m.layers, plan.layers)) == 1]
    assert len(singles) == 3 * 2  # three free layers, two other options each
    for move in moves:
        assert move.layers[0] == "softmax"
        changed = [i for i in range(4) if move.layers[i] != plan.layers[i]]
        assert 1 <= len(changed) <= 2
        if len(changed) == 2:  # one layer got cheaper, the other dearer
            deltas = sorted(SECONDS[move.layers[i]] - SECONDS[plan.layers[i]] for i in changed)
            assert deltas[0] < 0 < deltas[1]


def known_quality(seed: int = 0):
    rng = np.random.default_rng(seed)
    scores = {(layer, o): float(rng.uniform(0.01, 0.2) * (4 if o == "none" else 1))
              for layer in range(L) for o in ("linear", "none")}

    def quality(plan: LayerPlan) -> float:
        return sum(scores.get((i, o), 0.0) for i, o in enumerate(plan.layers))

    return quality


def test_gap_filling_with_an_exact_predictor_takes_the_best_gain_of_its_pool_and_adds_what_it_predicts():
    space, quality = SearchSpace(L, OPTIONS), known_quality(3)
    measured_plans = [LayerPlan.uniform("softmax", L), LayerPlan(("softmax",) * 4 + ("none",) * 4),
                      LayerPlan(("softmax", "linear") * 4)]
    completed = [(p, quality(p)) for p in measured_plans]
    reference = (COST.latency(LayerPlan.uniform("softmax", L)) * 1.05, 2.0)
    seen = {str(p) for p, _ in completed}

    def exact(plans):
        return np.array([quality(p) for p in plans]), np.zeros(len(plans))

    picks = gap_filling_plans([], completed, exact, space, COST, reference, 3, lambda p: str(p) not in seen)
    assert len(picks) == 3 and len({str(p) for p in picks}) == 3 and not {str(p) for p in picks} & seen
    measured = [(COST.latency(p), v) for p, v in completed]
    before = hypervolume_2d(measured, reference)
    # the first pick has the largest gain among every one-step neighbour of the measured front
    pool = {str(m): m for p, _ in completed for m in local_moves(p, OPTIONS, {}, SECONDS) if str(m) not in seen}
    best_gain = max(hypervolume_2d(measured + [(COST.latency(m), quality(m))], reference) - before
                    for m in pool.values())
    first_gain = hypervolume_2d(measured + [(COST.latency(picks[0]), quality(picks[0]))], reference) - before
    assert first_gain == pytest.approx(best_gain) and best_gain > 0
    after = hypervolume_2d(measured + [(COST.latency(p), quality(p)) for p in picks], reference)
    assert after > before + first_gain  # the later picks went to other gaps


def test_gap_filling_respects_the_allowed_check():
    space, quality = SearchSpace(L, OPTIONS), known_quality(4)
    completed = [(LayerPlan.uniform("softmax", L), 0.0)]
    reference = (0.3, 2.0)

    def exact(plans):
        return np.array([quality(p) for p in plans]), np.zeros(len(plans))

    no_none = gap_filling_plans([], completed, exact, space, COST, reference, 5, lambda p: "none" not in p.layers)
    assert no_none and all("none" not in p.layers for p in no_none)
    assert gap_filling_plans([], completed, exact, space, COST, reference, 5, lambda p: False) == []


def test_front_points_next_to_the_largest_gaps_come_first():
    points = [(1.0, 5.0), (2.0, 4.9), (3.0, 2.0), (3.1, 1.9), (4.0, 1.8), (5.0, 0.0)]
    # the ends first, then 1 and 2 (the 1 x 2.9 gap between them), then 4 (the 1 x 1.8 gap before the end)
    assert by_adjacent_gap(points)[:4] == [0, 5, 1, 2]


def test_staircase_values_read_the_best_quality_at_or_below_each_latency():
    front = [(1.0, 3.0), (2.0, 2.0), (4.0, 0.5)]
    values = staircase_values(front, np.array([0.5, 1.0, 1.5, 2.0, 3.9, 4.0, 9.0]), 2.5)
    assert values.tolist() == [2.5, 2.5, 2.5, 2.0, 2.0, 0.5, 0.5]  # 3.0 is above the ceiling 2.5
    assert staircase_values([], np.array([1.0]), 2.5).tolist() == [2.5]
