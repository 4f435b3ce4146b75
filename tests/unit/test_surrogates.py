"""Accuracy predictors, the exact front solver and surrogate proposals, on synthetic data with known answers:
the solver against brute-force enumeration, a planted interaction recovered by the predictor."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy.stats import spearmanr

from layerboost_core.plan import LayerPlan
from layerboost_core.space import SearchSpace
from layerboost_surrogates.accuracy import (AdditivePredictor, InteractionPredictor, QualityTerms, SensitivityTable,
                                            make_predictor)
from layerboost_surrogates.cost_model import AdditiveCostModel
from layerboost_surrogates.propose import propose_plans
from layerboost_surrogates.solver import FrontSolver

OPTIONS = ("softmax", "linear", "none")
L = 8
COST = AdditiveCostModel(base_seconds=0.1, per_layer_seconds={"softmax": 0.02, "linear": 0.0085, "none": 0.0},
                         uniform_seconds={}, workload={}, device="test", settings={"num_layers": L})
KV = {"softmax": 1000.0, "linear": 150.0, "none": 0.0}


def random_table(seed: int = 0, layers: int = L) -> SensitivityTable:
    rng = np.random.default_rng(seed)
    rows = [{"layer": layer, "option": o, "kl": float(rng.uniform(0.01, 0.2) * (4 if o == "none" else 1))}
            for layer in range(layers) for o in ("linear", "none")]
    return SensitivityTable.of(rows, layers)


def all_plans(layers: int = L) -> list[LayerPlan]:
    return [LayerPlan(names) for names in itertools.product(OPTIONS, repeat=layers)]


SPACES = {
    "free": SearchSpace(L, OPTIONS),
    "constrained": SearchSpace(L, OPTIONS, pinned={0: "softmax", 5: "none"}, min_count={"linear": 2},
                               max_count={"none": 3}),
    "no-none": SearchSpace(L, ("softmax", "linear"), pinned={7: "none"}),
}


def brute_force_best(space, terms, plans, budget=None, kv_budget=None):
    best = None
    for plan in plans:
        if space.violation(plan) is not None:
            continue
        if budget is not None and COST.latency(plan) > budget + 1e-12:
            continue
        if kv_budget is not None and sum(KV[o] for o in plan.layers) > kv_budget:
            continue
        value = terms.value(plan)
        best = value if best is None else min(best, value)
    return best


def check_against_brute_force(space, terms, budgets, kv_budget=None):
    solver = FrontSolver(space, COST, terms, KV)
    plans = all_plans()
    for budget in budgets:
        expected = brute_force_best(space, terms, plans, budget, kv_budget)
        plan = solver.solve(budget, kv_budget)
        if expected is None:
            assert plan is None
            continue
        assert space.violation(plan) is None
        assert COST.latency(plan) <= budget + 1e-9
        if kv_budget is not None:
            assert sum(KV[o] for o in plan.layers) <= kv_budget
        assert terms.value(plan) == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("name", sorted(SPACES))
def test_solver_finds_the_brute_force_optimum_of_an_additive_model(name):
    table = random_table()
    terms = AdditivePredictor(table).terms()
    rng = np.random.default_rng(1)
    budgets = [0.05] + list(rng.uniform(COST.base_seconds, COST.base_seconds + 0.02 * L, 6)) + [1.0]
    check_against_brute_force(SPACES[name], terms, budgets)


def test_solver_with_pairwise_terms_and_kv_budget_matches_brute_force():
    table = random_table(2)
    pairs = ((2, 1, 3, 1, 0.5), (4, 0, 5, 1, -0.3), (1, 1, 6, 1, 0.2), (0, 0, 7, 0, -0.1))
    terms = QualityTerms(table.options, table.values, pairs)
    rng = np.random.default_rng(3)
    budgets = list(rng.uniform(COST.base_seconds, COST.base_seconds + 0.02 * L, 5))
    check_against_brute_force(SPACES["constrained"], terms, budgets)
    check_against_brute_force(SPACES["free"], terms, budgets, kv_budget=3500.0)


def test_predicted_front_points_are_pareto_optimal_and_span_the_front():
    space = SPACES["constrained"]
    terms = AdditivePredictor(random_table(4)).terms()
    points = [(terms.value(p), COST.latency(p)) for p in all_plans() if space.violation(p) is None]
    front = FrontSolver(space, COST, terms).predicted_front(40)
    assert len(front) >= 5 and len({str(p) for p, _, _ in front}) == len(front)
    for plan, quality, latency in front:
        assert quality == pytest.approx(terms.value(plan)) and latency == pytest.approx(COST.latency(plan))
        assert not any(q < quality - 1e-9 and t <= latency + 1e-12 for q, t in points)
    assert front[0][2] == pytest.approx(min(t for _, t in points))
    assert front[-1][1] == pytest.approx(min(q for q, _ in points))
    assert [t for _, _, t in front] == sorted(t for _, _, t in front)


def test_solver_excludes_plans_and_reports_infeasible_budgets():
    space, terms = SPACES["free"], AdditivePredictor(random_table()).terms()
    solver = FrontSolver(space, COST, terms)
    assert solver.solve(COST.base_seconds - 0.01) is None
    seen = [solver.solve(0.2)]
    for _ in range(3):
        seen.append(solver.solve(0.2, exclude=seen))
    assert len({str(p) for p in seen}) == 4
    values = [terms.value(p) for p in seen]
    assert values == sorted(values)  # k-best in order


def planted_truth(table, gamma, pair=((3, "none"), (4, "none"))):
    def truth(plan):
        kl = float(table.prior([plan])[0])
        if all(plan.layers[layer] == option for layer, option in pair):
            kl += gamma
        return kl
    return truth


def random_plans(count, seed, layers=L, options=OPTIONS):
    rng = np.random.default_rng(seed)
    return [LayerPlan(tuple(rng.choice(options, layers))) for _ in range(count)]


def test_interaction_predictor_recovers_a_planted_pair_and_ranks_held_out_plans():
    table = random_table(5)
    gamma = 1.5
    truth = planted_truth(table, gamma)
    noise = np.random.default_rng(6)
    train, test = random_plans(250, 7), random_plans(200, 8)
    y = [truth(p) * (1 + 0.01 * noise.standard_normal()) for p in train]
    predictor = InteractionPredictor(table, pairs="adjacent").fit(train, y)
    coefficients = predictor.pair_coefficients()
    assert coefficients[((3, "none"), (4, "none"))] == pytest.approx(gamma, rel=0.1)
    others = [abs(c) for key, c in coefficients.items() if key != ((3, "none"), (4, "none"))]
    assert max(others) < 0.1 * gamma
    mean, variance = predictor.predict(test)
    assert np.all(variance > 0)
    truth_test = [truth(p) for p in test]
    assert spearmanr(mean, truth_test).statistic >= 0.9
    assert spearmanr(mean, truth_test).statistic > spearmanr(table.prior(test), truth_test).statistic
    # the solver optimises exactly what predict() returns
    terms = predictor.terms()
    assert [terms.value(p) for p in test[:20]] == pytest.approx(list(mean[:20]), rel=1e-9, abs=1e-12)


def test_interaction_predictor_with_all_pairs_finds_a_distant_pair():
    table = random_table(9)
    truth = planted_truth(table, 1.0, pair=((1, "linear"), (6, "none")))
    train, test = random_plans(400, 10), random_plans(200, 11)
    predictor = InteractionPredictor(table, pairs="all").fit(train, [truth(p) for p in train])
    assert predictor.pair_coefficients()[((1, "linear"), (6, "none"))] == pytest.approx(1.0, rel=0.1)
    assert spearmanr(predictor.predict(test)[0], [truth(p) for p in test]).statistic >= 0.9


def test_variance_is_higher_away_from_the_data():
    table = SensitivityTable.of({(layer, o): 0.1 for layer in range(L) for o in ("linear", "none")}, L)
    rng = np.random.default_rng(12)
    # trials only ever change layers 0-3; the same patterns on layers 4-7 are far from the data
    patterns = [tuple(rng.choice(OPTIONS, 4)) for _ in range(60)]
    near = [LayerPlan(p + ("softmax",) * 4) for p in patterns]
    far = [LayerPlan(("softmax",) * 4 + p) for p in patterns]
    truth = planted_truth(table, 0.3, pair=((1, "linear"), (2, "none")))
    predictor = InteractionPredictor(table).fit(near[:40], [truth(p) for p in near[:40]])
    near_var, far_var = predictor.predict(near[40:])[1], predictor.predict(far[40:])[1]
    swapped = np.array([p.count("softmax") < 8 for p in near[40:]])
    assert np.all(far_var[swapped] > near_var[swapped])


def test_additive_predictor_fits_a_global_scale():
    table = random_table(13)
    plans = random_plans(30, 14)
    predictor = AdditivePredictor(table).fit(plans, 2.5 * table.prior(plans))
    assert predictor.scale == pytest.approx(2.5)
    mean, variance = predictor.predict(plans)
    assert mean == pytest.approx(2.5 * table.prior(plans))
    assert isinstance(make_predictor(table, plans[:3], [1.0] * 3), AdditivePredictor)
    assert isinstance(make_predictor(table, plans, list(mean)), InteractionPredictor)


def test_sensitivity_table_refuses_missing_scores():
    with pytest.raises(ValueError, match="no score for layer 1 / none"):
        SensitivityTable.of([{"layer": 0, "option": "linear", "kl": 0.1}, {"layer": 0, "option": "none", "kl": 0.2},
                             {"layer": 1, "option": "linear", "kl": 0.1}], 2)


@pytest.mark.parametrize("trials", [0, 30])
def test_propose_plans_returns_new_distinct_plans_of_the_space(trials):
    space = SPACES["constrained"]
    table = random_table(15)
    truth = planted_truth(table, 1.0)
    completed = [(p, truth(p)) for p in random_plans(200, 16) if space.violation(p) is None][:trials]
    pending = {str(p) for p in random_plans(5, 17)}
    plans = propose_plans(space, COST, table, completed, 6, seed=3, exclude=pending, latency_ceiling=0.2)
    assert len(plans) == 6 and len({str(p) for p in plans}) == 6
    for plan in plans:
        assert space.violation(plan) is None and COST.latency(plan) <= 0.2 + 1e-9
        assert str(plan) not in pending and str(plan) not in {str(p) for p, _ in completed}
    again = propose_plans(space, COST, table, completed, 6, seed=3, exclude=pending, latency_ceiling=0.2)
    assert [str(p) for p in again] == [str(p) for p in plans]


def test_propose_plans_keeps_proposing_once_the_predicted_front_is_evaluated():
    space, table = SPACES["free"], random_table(18)
    front = FrontSolver(space, COST, AdditivePredictor(table).terms()).predicted_front(50)
    completed = [(p, float(table.prior([p])[0])) for p, _, _ in front]
    plans = propose_plans(space, COST, table, completed, 4, seed=0)
    assert len(plans) == 4 and not {str(p) for p in plans} & {str(p) for p, _ in completed}


def test_propose_plans_with_max_loss_stays_on_the_bounded_part_of_the_front():
    space, table = SPACES["free"], random_table(19)
    predictor = AdditivePredictor(table)  # before any trial, proposals are the additive front
    cap = 0.5  # all-none is predicted far above it (8 layers x 0.04-0.8)
    assert float(table.prior([LayerPlan.uniform("none", L)])[0]) > 2 * cap
    plans = propose_plans(space, COST, table, [], 5, seed=0, max_loss=cap)
    assert len(plans) == 5
    assert all(predictor.terms().value(p) <= cap + 1e-9 for p in plans), [str(p) for p in plans]
    unbounded = propose_plans(space, COST, table, [], 5, seed=0)
    assert any(predictor.terms().value(p) > cap for p in unbounded)  # the bound is what kept them out


def test_plan_of_params_restores_pinned_layers():
    space = SPACES["constrained"]
    plan = LayerPlan(("softmax", "linear", "linear", "none", "softmax", "none", "softmax", "linear"))
    assert space.plan_of_params(space.params_of(plan)) == plan


def test_propose_plans_refuses_all_pairs():
    with pytest.raises(ValueError, match="pairs"):
        propose_plans(SPACES["free"], COST, random_table(), [], 2, pairs="all")


def test_propose_plans_keeps_away_from_plans_that_lost_the_retrieval_floor():
    """Plans keeping fewer than 4 softmax layers lost the floor here: unguarded, the fast end of the predicted front
    is next to them; with `lost`, every proposal is at least as near a plan that kept it."""
    from layerboost_surrogates.propose import layers_apart

    space, table = SPACES["free"], random_table(20)
    truth = planted_truth(table, 1.0)
    completed = [(p, truth(p)) for p in random_plans(40, 21)]
    lost = {str(p) for p, _ in completed if p.count("softmax") < 4}
    kept = [p for p, _ in completed if str(p) not in lost]
    assert lost and kept

    def near_kept(plan):
        return min(layers_apart(plan, q) for q in kept) <= min(layers_apart(plan, LayerPlan.from_string(q))
                                                               for q in lost)

    guarded = propose_plans(space, COST, table, completed, 6, seed=0, lost=lost)
    assert guarded and all(near_kept(p) for p in guarded), [str(p) for p in guarded]
    unguarded = propose_plans(space, COST, table, completed, 6, seed=0)
    assert not all(near_kept(p) for p in unguarded)  # the guard is what kept them away
