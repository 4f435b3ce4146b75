"""`layerboost bench`: measurements of a plan beside all-softmax on a tiny model, and its input checks."""
from __future__ import annotations

import pytest

from layerboost_core.bench import BASELINE, BenchSettings, format_table, measure_plans, ratio_rows, step_time_at
from layerboost.cli import main
from layerboost_core.errors import UserError
from layerboost_core.patch import PlanSwitcher
from layerboost_core.plan import LayerPlan
from layerboost_surrogates.cost_model import kv_bytes_per_sequence

SETTINGS = {"linear": {"window": 4, "feature_dim": 8, "sinks": 2}}


def test_measure_plans_side_by_side(tiny_model):
    model = tiny_model("llama")
    switcher = PlanSwitcher(model, SETTINGS)
    plans = {BASELINE: LayerPlan.uniform("softmax", 4), "plan": LayerPlan.from_string("SLNL")}
    settings = BenchSettings(contexts=(12,), batches=(1, 2), decode_tokens=3, memory_budget_gb=0.02)  # ~13 MiB of weights
    rows = measure_plans(switcher, plans, settings)
    assert [(r["plan_label"], r["batch"]) for r in rows] == [(BASELINE, 1), ("plan", 1), (BASELINE, 2), ("plan", 2)]
    assert str(switcher.plan) == "SSSS"  # restored
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    for r in rows:
        plan = plans[r["plan_label"]]
        assert r["kv_bytes"] == kv_bytes_per_sequence(plan, model.config, SETTINGS, 12 + 3, 4) * r["batch"]
        assert r["max_batch"] == (int(0.02 * 1024**3) - weights) // r["kv_bytes_per_seq"] > 2
        assert r["max_batch_tok_s"] > 0 and r["throughput_source"].startswith("estimated")
        assert r["peak_bytes"] == weights + r["kv_bytes"] and r["decode_tok_s"] > 0 and r["prefill_s"] > 0
    ratios = ratio_rows(rows)
    assert len(ratios) == 2 and all(q["kv_ratio"] < 1 for q in ratios)
    assert "ratios to all-softmax" in format_table(rows)


def test_a_plan_without_cache_is_not_memory_bound(tiny_model):
    switcher = PlanSwitcher(tiny_model("llama"), SETTINGS)
    rows = measure_plans(switcher, {"none": LayerPlan.uniform("none", 4)},
                         BenchSettings(contexts=(5,), batches=(1,), decode_tokens=1))
    assert rows[0]["kv_bytes"] == 0 and rows[0]["max_batch"] is None


def test_step_time_estimate():
    assert step_time_at(8, {1: 0.1, 8: 0.3}) == pytest.approx(0.3)
    assert step_time_at(15, {1: 0.1, 8: 0.3}) == pytest.approx(0.1 + 14 * 0.2 / 7)
    assert step_time_at(16, {4: 0.2}) == pytest.approx(0.8)
    assert step_time_at(100, {1: 0.3, 8: 0.2}) == pytest.approx(0.3)  # noise never makes big batches faster


@pytest.mark.parametrize("kwargs, message", [
    (dict(contexts=()), r"^bench.contexts: \[\] must be a non-empty list of positive integers$"),
    (dict(batches=(0,)), r"^bench.batches: \[0\] must be"),
    (dict(decode_tokens=0), r"^bench.decode_tokens: 0 must be >= 1$"),
    (dict(memory_budget_gb=0.0), r"^bench.memory_budget_gb: 0.0 must be > 0$"),
])
def test_settings_are_checked(kwargs, message):
    with pytest.raises(UserError, match=message):
        BenchSettings(**kwargs)


@pytest.mark.parametrize("overrides, message", [
    (["model=tiny:llama"], "error: plan: missing; pass plan="),
    (["model=tiny:llama", "plan=SLSL", "bench.decode_tokens=0"], "error: bench.decode_tokens: 0 must be >= 1"),
])
def test_bench_verb_refuses_bad_input_before_loading(overrides, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", *overrides])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().startswith(message)
