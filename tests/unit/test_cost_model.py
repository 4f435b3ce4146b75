"""The serving cost model: workloads are validated, a plan's concurrency is the cache-bytes arithmetic, a plan's
predicted serving is composed from the measured pieces, and the pieces are measured once and cached."""
from __future__ import annotations

import json
import math
from dataclasses import asdict

import pytest
import torch

from layerboost_core.cache import HybridCache
from layerboost_core.errors import UserError
from layerboost_core.patch import PlanSwitcher
from layerboost_core.plan import LayerPlan
from layerboost_core.serving import Served
from layerboost_core.workload import GIB, Workload
from layerboost_surrogates.cost_model import kv_bytes_per_layer, kv_bytes_per_sequence, sequences_at_once
from layerboost_surrogates.serving_cost import (ServingCostModel, concurrency_grid, interpolate, serving_cost_model,
                                                speed_cost)

SETTINGS = {"linear": {"window": 4, "feature_dim": 8, "sinks": 2}}
INFO = {"name": "tiny", "fingerprint": "f" * 16}


@pytest.mark.parametrize("field, value, message", [
    ("prefill", 0, "workload.prefill: 0 must be a whole number >= 1"),
    ("batch", 0, "workload.batch: 0 must be a whole number >= 1"),
    ("repeats", 0, "workload.repeats: 0 must be a whole number >= 1"),
    ("decode", -1, "workload.decode: -1 must be a whole number >= 0"),
    ("memory_gib", -1.0, "workload.memory_gib: -1.0 must be a positive number of GiB or null"),
    ("memory_gib", "lots", "workload.memory_gib: 'lots' must be a positive number of GiB or null"),
    ("memory_sequences", 0, "workload.memory_sequences: 0 must be a whole number >= 1"),
])
def test_bad_workload_is_one_clear_error(field, value, message):
    with pytest.raises(UserError) as refused:
        Workload(**{field: value})
    assert str(refused.value).startswith(message) and "\n" not in str(refused.value)


def test_concurrency_is_the_memory_left_by_the_weights_over_one_sequences_cache():
    workload = Workload(prefill=100, decode=28, batch=16, memory_gib=1.0)
    original = 200 * 2**20  # one all-softmax sequence
    assert workload.concurrency(100 * 2**20, 2**29, original) == 5  # (1024 - 512) MiB // 100 MiB
    assert workload.concurrency(2**20, 2**29, original) == 16  # capped at batch
    assert workload.concurrency(0, 2**29, original) == 16  # no cache: never memory-bound
    assert workload.concurrency(2**30, 2**29, original) == 0  # not even one fits
    assert Workload(batch=3, memory_gib=None, memory_sequences=None).concurrency(10**12, 10**12, 10**12) == 3
    # a budget of the weights and 4 of the original's sequences: the original serves 4, a cache half as big 8
    by_sequences = Workload(prefill=100, decode=28, batch=16, memory_gib=None, memory_sequences=4)
    assert by_sequences.budget_bytes(2**29, original) == 2**29 + 4 * original
    assert by_sequences.concurrency(original, 2**29, original) == 4
    assert by_sequences.concurrency(original // 2, 2**29, original) == 8
    assert Workload(memory_gib=1.0, memory_sequences=4).budget_bytes(2**29, original) == 2**30  # GiB first


@pytest.mark.parametrize("plan", ["SSSS", "LLLL", "1111", "SLN1", "NNNN"])
def test_cache_bytes_per_layer_are_what_the_hybrid_cache_holds(tiny_model, plan):
    """The arithmetic the concurrency rests on: per-layer bytes summed equal the bytes a real cache holds after
    a prefill and decode steps (so the concurrency a budget allows is exact)."""
    settings = {**SETTINGS, "mixed1": {"kept_heads": [[0], [1], [0], [1]]}}
    model = tiny_model("llama")
    PlanSwitcher(model, settings).apply(LayerPlan.from_string(plan))
    config, context = model.config, 13
    cache = HybridCache(model)
    with torch.inference_mode():
        model(torch.randint(3, 1000, (1, 10)), cache=cache)
        for _ in range(context - 10):
            model(torch.randint(3, 1000, (1, 1)), cache=cache)
    layers = LayerPlan.from_string(plan).layers
    per_layer = {o: kv_bytes_per_layer(o, config, settings, context, 4, 4) for o in set(layers)}
    assert sum(per_layer[o][i] for i, o in enumerate(layers)) == cache.kv_bytes()
    assert kv_bytes_per_sequence(LayerPlan.from_string(plan), config, settings, context, 4) == cache.kv_bytes()


def synthetic(workload: Workload, grid=(2, 4, 8), speed="throughput") -> ServingCostModel:
    """A cost model of 4 layers from made-up pieces: softmax layers cost most and keep the biggest cache."""
    grid = list(grid)
    return ServingCostModel(
        workload=asdict(workload), grid=grid, base_prefill_s=1.0,
        prefill_s={"softmax": 0.5, "linear": 0.3, "none": 0.0},
        base_step_s=[0.10, 0.12, 0.16],
        step_s={"softmax": [0.02, 0.04, 0.08], "linear": [0.01, 0.012, 0.016], "none": [0.0, 0.0, 0.0]},
        kv_layer_bytes={"softmax": [100 * 2**20] * 4, "linear": [2**20] * 4, "none": [0] * 4},
        weight_bytes=2**30, rounds={}, device="cpu", settings={"num_layers": 4}, speed=speed)


def test_a_plans_serving_is_composed_from_the_pieces():
    workload = Workload(prefill=64, decode=32, batch=8, memory_gib=2.0)
    cost = synthetic(workload)
    plan = LayerPlan.from_string("SSLN")
    # concurrency: (2 GiB - 1 GiB) over 2 x 100 MiB + 1 MiB
    assert cost.concurrency(plan) == (2**30) // (201 * 2**20) == 5
    assert cost.ttft(plan) == pytest.approx(1.0 + 2 * 0.5 + 0.3)
    step_at = {b: base + 2 * s + lin for b, base, s, lin in zip([2, 4, 8], [0.10, 0.12, 0.16], [0.02, 0.04, 0.08],
                                                                 [0.01, 0.012, 0.016])}
    tpot = step_at[4] + (step_at[8] - step_at[4]) * (5 - 4) / 4  # linear between the grid points 4 and 8
    served = cost.predict(plan)
    assert served == Served(pytest.approx(2.3), pytest.approx(tpot), 5, 32)
    assert served.throughput == pytest.approx(5 * 32 / (5 * 2.3 + 32 * tpot))
    assert served.latency_s == pytest.approx(5 * 2.3 + 32 * tpot)
    assert cost.latency(plan) == pytest.approx(1 / served.throughput)  # throughput's cost: seconds per token
    assert cost.with_speed("ttft").latency(plan) == pytest.approx(2.3)
    assert cost.with_speed("tpot").latency(plan) == pytest.approx(tpot)
    assert cost.concurrency(LayerPlan.uniform("none", 4)) == 8  # no cache: the cap


def test_each_additive_view_prices_plans_that_fit_its_concurrency_exactly():
    cost = synthetic(Workload(prefill=64, decode=32, batch=8, memory_gib=2.0))
    assert [v.workload["concurrency"] for v, _ in cost.views(1)] == [2]
    assert [v.workload["concurrency"] for v, _ in cost.views(2)] == [2, 8]
    assert set(cost.per_layer_seconds) == {"softmax", "linear", "none"}  # the gap filler's ranking of options
    for view, kv_budget in cost.views():
        b = view.workload["concurrency"]
        assert kv_budget == pytest.approx(2**30 / b)
        for text in ("SSLN", "LLLL", "SLSL"):
            plan = LayerPlan.from_string(text)
            at_b = Served(cost.ttft(plan), cost.tpot(plan, b), b, 32)
            assert view.latency(plan) == pytest.approx(speed_cost(at_b, "throughput"))


def test_interpolation_and_grid():
    assert concurrency_grid(3, 16) == [3, 12, 16] and concurrency_grid(4, 32) == [4, 16, 32]
    assert concurrency_grid(16, 16) == [16]
    assert interpolate([2, 4], [1.0, 3.0], 3) == pytest.approx(2.0)
    assert interpolate([2, 4], [1.0, 3.0], 6) == pytest.approx(5.0)  # beyond the end: the last segment's line
    assert interpolate([4], [2.0], 2) == pytest.approx(1.0)


def test_a_prefill_only_workload_prices_the_prefill():
    cost = synthetic(Workload(prefill=64, decode=0, batch=1, memory_gib=None, memory_sequences=None), grid=(),
                     speed="latency")
    cost.base_step_s, cost.step_s = [], {o: [] for o in cost.step_s}
    plan = LayerPlan.from_string("SLNN")
    assert cost.predict(plan).tpot_s is None and cost.predict(plan).throughput == 0.0
    assert cost.latency(plan) == pytest.approx(cost.ttft(plan)) == pytest.approx(1.8)
    assert speed_cost(cost.predict(plan), "throughput") == math.inf


def test_an_option_is_dominated_only_when_every_round_of_every_piece_is_slower():
    cost = synthetic(Workload(prefill=64, decode=32, batch=8, memory_gib=None, memory_sequences=None), grid=(8,))
    cost.rounds = {"softmax": {"prefill": [1.0, 1.1, 1.2], "step": [[0.5], [0.55], [0.6]]},
                   "linear": {"prefill": [1.3, 1.4, 1.25], "step": [[0.7], [0.65], [0.61]]},
                   "none": {"prefill": [1.15, 1.3, 1.4], "step": [[0.7], [0.7], [0.7]]}}
    assert cost.dominated("linear", kv_matters=False)  # slower in every round of every piece
    assert not cost.dominated("none", kv_matters=False)  # one prefill round overlaps softmax's: no decision
    assert not cost.dominated("linear", kv_matters=True)  # a smaller cache pays where memory matters


def test_pieces_are_measured_once_and_cached_with_every_round(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("LAYERBOOST_CACHE", str(tmp_path))
    settings = {**SETTINGS, "mixed1": {"kept_heads": [[0], [1], [0], [1]]}}
    switcher = PlanSwitcher(tiny_model("llama"), settings)
    workload = Workload(prefill=16, decode=4, batch=4, memory_gib=None, memory_sequences=None, repeats=2)
    options = ("softmax", "linear", "mixed1", "none")
    cost = serving_cost_model(switcher, INFO, settings, workload, options)
    assert cost.grid == [4] and set(cost.prefill_s) == set(options)
    assert all(len(r["prefill"]) == 2 and len(r["step"]) == 2 for r in cost.rounds.values())
    for option in options:  # a uniform plan is its own measurement (the median of its rounds)
        uniform = LayerPlan.uniform(option, 4)
        assert cost.ttft(uniform) == pytest.approx(min(cost.rounds[option]["prefill"]))  # the fastest round
    (stored,) = (tmp_path / "costs").glob("tiny-serving-*.json")
    assert json.loads(stored.read_text())["workload"]["decode"] == 4
    again = serving_cost_model(switcher, INFO, settings, workload, options)
    assert again.rounds == cost.rounds  # read back, not measured again
    assert switcher.plan == LayerPlan.uniform("softmax", 4)  # restored


def test_measured_serving_gives_each_plan_the_concurrency_the_cost_model_prices(tiny_model, tmp_path, monkeypatch):
    """What the search prices and what the measured serving runs at are one arithmetic: the same number of
    sequences at once for every plan under a memory budget (smaller caches, more sequences)."""
    monkeypatch.setenv("LAYERBOOST_CACHE", str(tmp_path))
    settings = {**SETTINGS, "mixed1": {"kept_heads": [[0], [1], [0], [1]]}}
    switcher = PlanSwitcher(tiny_model("llama"), settings)
    # 128 tokens: long enough that a linear layer's window and state are smaller than softmax's KV
    workload = Workload(prefill=120, decode=8, batch=16, memory_gib=None, memory_sequences=2, repeats=1)
    cost = serving_cost_model(switcher, INFO, settings, workload, ("softmax", "linear", "mixed1", "none"))
    plans = {text: LayerPlan.from_string(text) for text in ("SSSS", "SLSL", "1111", "LLLL", "NNNN")}
    at_once = sequences_at_once(switcher.model, settings, workload, plans)
    assert at_once == {text: cost.concurrency(plan) for text, plan in plans.items()}
    assert at_once["SSSS"] == 2 and at_once["NNNN"] == 16  # the budget's own sequences; no cache: the cap
    assert at_once["SSSS"] < at_once["SLSL"] < at_once["LLLL"]  # smaller caches, more sequences at once


def test_a_budget_that_cannot_hold_one_sequence_is_refused(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("LAYERBOOST_CACHE", str(tmp_path))
    switcher = PlanSwitcher(tiny_model("llama"), SETTINGS)
    with pytest.raises(UserError, match=r"^workload.memory_gib: 1e-06 GiB does not hold the weights"):
        serving_cost_model(switcher, INFO, SETTINGS, Workload(prefill=16, decode=4, batch=4, memory_gib=1e-6),
                           ("softmax", "none"))
    assert int(GIB) == 2**30


def test_ceilings_are_predicted_with_slack_and_cache_bytes_exactly():
    from layerboost_search.objectives import predicted_constraints
    from layerboost_search.settings import ObjectiveSettings

    cost = synthetic(Workload(prefill=64, decode=32, batch=8, memory_gib=2.0))
    plan = LayerPlan.from_string("SSSL")  # TTFT 1 + 3 x 0.5 + 0.3 = 2.8 s against all-softmax's 3.0 s
    ttft = cost.ttft(plan) / cost.ttft(LayerPlan.uniform("softmax", 4))
    assert predicted_constraints(ObjectiveSettings(ceilings={"ttft": 0.9}, ceiling_slack=0.0), cost, plan)[
        "ttft_ceiling"] == pytest.approx(ttft - 0.9)
    with_slack = predicted_constraints(ObjectiveSettings(ceilings={"ttft": 0.9}), cost, plan)["ttft_ceiling"]
    assert with_slack == pytest.approx(ttft - 0.99) and with_slack < 0  # 0.933 is within the 10% slack of 0.9
    kv = predicted_constraints(ObjectiveSettings(ceilings={"kv_bytes": 0.75}), cost, plan)["kv_bytes_ceiling"]
    assert kv == pytest.approx(cost.kv_bytes(plan) / cost.kv_bytes(LayerPlan.uniform("softmax", 4)) - 0.75)  # exact


def test_candidates_keep_the_ceilings_within_their_slack_and_the_retrieval_floor_on_point_estimates():
    """Confirmation is spent on a plan predicted within the slack of a ceiling (as measured serving judges it), not
    on one past the slack, nor on a plan whose proxy facts fall below the floor even when they do not prove it
    below."""
    from optuna.trial import create_trial

    from layerboost_search.objectives import keeps_floors_at_proxy
    from layerboost_search.settings import ObjectiveSettings

    cost = synthetic(Workload(prefill=64, decode=32, batch=8, memory_gib=2.0))

    def trial(plan, found):
        return create_trial(values=[0.1, 1.0], user_attrs={"plan": plan, "proxy:retrieval_acc": found})

    # SSSL: 0.933 of all-softmax's TTFT
    assert keeps_floors_at_proxy(ObjectiveSettings(ceilings={"ttft": 0.9}), cost, None)(trial("SSSL", 1.0))
    assert not keeps_floors_at_proxy(ObjectiveSettings(ceilings={"ttft": 0.9}, ceiling_slack=0.0), cost,
                                     None)(trial("SSSL", 1.0))
    assert not keeps_floors_at_proxy(ObjectiveSettings(ceilings={"ttft": 0.8}), cost, None)(trial("SSSL", 1.0))
    assert keeps_floors_at_proxy(ObjectiveSettings(ceilings={"ttft": 0.95}, ceiling_slack=0.0), cost,
                                 None)(trial("SSSL", 1.0))
    keeps = keeps_floors_at_proxy(ObjectiveSettings(ceilings={}), cost, 0.9)
    assert keeps(trial("SSSL", 0.9375)) and not keeps(trial("SSSL", 0.875))  # 15 of 16 facts; 14 of 16
    assert not keeps(create_trial(values=[0.1, 1.0], user_attrs={"plan": "SSSL"}))  # retrieval never measured


def test_confirmation_draws_its_candidates_from_plans_that_keep_the_floors_beyond_the_front():
    """SSLL keeps the retrieval floor on its proxy facts but SLLL, which loses a fact in five, dominates it on the
    front: it is still confirmed (before SLLL), since only a plan keeping the floors can be offered."""
    import optuna
    from optuna.trial import create_trial

    from layerboost_search.pipeline import _candidates, reference_serving
    from layerboost_search.report import ORIGINAL_ATTR
    from layerboost_search.settings import SearchSettings

    cost = synthetic(Workload(prefill=64, decode=32, batch=8, memory_gib=2.0))
    study = optuna.create_study(directions=["minimize", "maximize"])
    study.set_user_attr(ORIGINAL_ATTR, {"metrics": {"retrieval_acc": 1.0}, "facts": 16})
    for plan, kl, found in (("SSSS", 0.0, 1.0), ("LLLL", 0.2, 0.75), ("SLLL", 0.1, 0.8125), ("SSLL", 0.15, 0.9375)):
        served = cost.predict(LayerPlan.from_string(plan))
        study.add_trial(create_trial(values=[kl, served.throughput], user_attrs={
            "plan": plan, "feasible": True, "proxy:top1_agreement": 1 - kl, "proxy:retrieval_acc": found}))
    front = sorted(t.user_attrs["plan"] for t in study.best_trials)
    assert front == ["LLLL", "SLLL", "SSSS"]  # SSLL is dominated
    chosen = [t.user_attrs["plan"] for t in _candidates(study, 3, SearchSettings(), reference_serving(cost, 4), cost)]
    assert chosen[:2] == ["SSSS", "SSLL"] and len(chosen) == 3 and chosen[2] in ("LLLL", "SLLL")
