"""Serving measured: the steady-state arithmetic, caches of separately prefilled requests stacked into one batch,
and plans taking turns at their own concurrency."""
from __future__ import annotations

import pytest
import torch

from layerboost_core.cache import HybridCache, stack_caches
from layerboost_core.patch import PlanSwitcher
from layerboost_core.plan import LayerPlan
from layerboost_core.serving import Served, serve_in_turns, serve_requests
from layerboost_core.workload import Workload

SETTINGS = {"linear": {"window": 4, "feature_dim": 8, "sinks": 2}, "mixed1": {"kept_heads": [[0], [1], [0], [1]]}}


def test_steady_state_throughput_and_latency():
    served = Served(ttft_s=2.0, tpot_s=0.1, concurrency=4, decode=100)
    assert served.throughput == pytest.approx(4 * 100 / (4 * 2.0 + 100 * 0.1))
    assert served.latency_s == pytest.approx(4 * 2.0 + 100 * 0.1)  # Little's law: in flight / arrival rate
    assert served.latency_s == pytest.approx(served.concurrency * served.decode / served.throughput)
    prefill_only = Served(ttft_s=2.0, tpot_s=None, concurrency=1, decode=0)
    assert prefill_only.throughput == 0.0 and prefill_only.latency_s == 2.0
    assert Served(2.0, None, 0, 10).latency_s == float("inf")  # not one sequence fits


@pytest.mark.parametrize("plan", ["SSSS", "SLN1", "LLLL"])
def test_stacked_caches_decode_as_a_batch_prefilled_together(tiny_model, plan):
    model = tiny_model("llama")
    PlanSwitcher(model, SETTINGS).apply(LayerPlan.from_string(plan))
    prompts = torch.randint(3, 1000, (3, 12), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        together = HybridCache(model)
        model(prompts, cache=together)
        caches = []
        for row in prompts:
            cache = HybridCache(model)
            model(row[None], cache=cache)
            caches.append(cache)
        stacked = stack_caches(caches)
        step = torch.randint(3, 1000, (3, 1), generator=torch.Generator().manual_seed(1))
        expected = model(step, cache=together).logits
        got = model(step, cache=stacked).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    assert stacked.kv_bytes() == together.kv_bytes()


def test_plans_take_turns_each_at_its_own_concurrency(tiny_model):
    switcher = PlanSwitcher(tiny_model("llama"), SETTINGS)
    plans = {"all-softmax": LayerPlan.from_string("SSSS"), "hybrid": LayerPlan.from_string("SLN1")}
    workload = Workload(prefill=16, decode=6, batch=8, memory_sequences=None)
    served = serve_in_turns(switcher, plans, workload, {"all-softmax": 2, "hybrid": 5}, rounds=2, steps=2)
    assert [s.concurrency for s in served["all-softmax"]] == [2, 2]
    assert [s.concurrency for s in served["hybrid"]] == [5, 5]
    assert all(s.ttft_s > 0 and s.tpot_s > 0 and s.decode == 6 for runs in served.values() for s in runs)
    assert switcher.plan == LayerPlan.uniform("softmax", 4)


def test_serving_whole_requests_times_every_prefill_and_step(tiny_model):
    model = tiny_model("llama")
    PlanSwitcher(model, SETTINGS).apply(LayerPlan.from_string("SLN1"))
    result = serve_requests(model, Workload(prefill=16, decode=5, batch=3, memory_sequences=None), concurrency=3)
    assert len(result["prefill_s"]) == 3 and len(result["step_s"]) == 5
    total = sum(result["prefill_s"]) + sum(result["step_s"])
    assert result["throughput"] == pytest.approx(3 * 5 / total)
