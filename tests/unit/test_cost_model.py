"""The latency cost model: workloads are validated, a request is a prefill plus cached decode steps, and the
model built from the uniform plans is additive and cached with its settings."""
from __future__ import annotations

import json

import pytest
import torch

from layerboost_core.errors import UserError
from layerboost_core.patch import PlanSwitcher
from layerboost_core.plan import LayerPlan
from layerboost_surrogates.cost_model import Workload, cost_model, run_request

SETTINGS = {"linear": {"window": 4, "feature_dim": 8, "sinks": 2}}


@pytest.mark.parametrize("field, value", [("prefill", 0), ("batch", 0), ("repeats", 0), ("decode", -1)])
def test_bad_workload_is_one_clear_error(field, value):
    with pytest.raises(UserError, match=f"workload.{field}: {value}"):
        Workload(**{field: value})


@pytest.mark.parametrize("plan", ["SSSS", "LLLL", "NNNN", "SLNL"])
def test_a_request_is_one_prefill_then_one_forward_per_decode_step(tiny_model, plan):
    model = tiny_model("llama")
    PlanSwitcher(model, SETTINGS).apply(LayerPlan.from_string(plan))
    lengths = []
    model.model.register_forward_hook(lambda module, args, kwargs, out: lengths.append(kwargs["input_ids"].shape[1]),
                                      with_kwargs=True)
    with torch.inference_mode():
        run_request(model, torch.randint(3, 1000, (2, 9)), decode=3)
    assert lengths == [9, 1, 1, 1]


def test_cost_model_with_decode_is_additive_and_cached_with_its_workload(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("LAYERBOOST_CACHE", str(tmp_path))
    model = tiny_model("llama")
    switcher = PlanSwitcher(model, SETTINGS)
    info = {"name": "tiny", "fingerprint": "f" * 16}
    workload = Workload(prefill=16, decode=3, batch=1, repeats=1)
    cost = cost_model(switcher, info, SETTINGS, workload)
    for option in ("softmax", "linear", "none"):  # the uniform plans are reproduced exactly
        assert cost.latency(LayerPlan.uniform(option, 4)) == pytest.approx(cost.uniform_seconds[option])
    mixed = LayerPlan.from_string("SLNS")
    expected = cost.base_seconds + 2 * cost.per_layer_seconds["softmax"] + cost.per_layer_seconds["linear"]
    assert cost.latency(mixed) == pytest.approx(expected)
    (stored,) = (tmp_path / "costs").glob("tiny-*.json")
    assert json.loads(stored.read_text())["workload"]["decode"] == 3
    assert cost_model(switcher, info, SETTINGS, workload) == cost  # second call reads the cache


def test_a_uniform_mixed_plan_is_timed_like_the_others(tiny_model, tmp_path, monkeypatch):
    """All-`mixed1` is built from its kept_heads setting and untrained `linear` parts (timing needs no bank)."""
    monkeypatch.setenv("LAYERBOOST_CACHE", str(tmp_path))
    settings = {**SETTINGS, "mixed1": {"kept_heads": [[0], [1], [0], [1]]}}
    switcher = PlanSwitcher(tiny_model("llama"), settings)
    options = ("softmax", "linear", "mixed1", "none")
    cost = cost_model(switcher, {"name": "tiny", "fingerprint": "f" * 16}, settings,
                      Workload(prefill=16, decode=2, batch=1, repeats=1), options)
    assert set(cost.per_layer_seconds) == set(options)
    assert cost.latency(LayerPlan.uniform("mixed1", 4)) == pytest.approx(cost.uniform_seconds["mixed1"])
    expected = cost.base_seconds + cost.per_layer_seconds["mixed1"] + cost.per_layer_seconds["softmax"]
    assert cost.latency(LayerPlan.from_string("1SNN")) == pytest.approx(expected)
    assert cost.fastest(options) <= cost.uniform_seconds["mixed1"]
    with pytest.raises(ValueError, match=r"^the cost model timed softmax, linear, none, not 'mixed1'"):
        cost_model(switcher, {"name": "tiny", "fingerprint": "f" * 16}, settings,
                   Workload(prefill=16, decode=0, batch=1, repeats=1)).latency(LayerPlan.from_string("1SNN"))
