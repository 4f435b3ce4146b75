"""PlanSwitcher: plans applied in place, cheaply, reproducibly; all-softmax is the unpatched model exactly."""
from __future__ import annotations

import pytest
import torch

from layerboost_core.inference.linear_attention import LinearSlidingWindowAttention
from layerboost_core.inference.no_attention import NoAttention
from layerboost_core.errors import UserError
from layerboost_core.patch import PlanSwitcher
from layerboost_core.plan import LayerPlan

from ..conftest import LINEAR_SETTINGS, MAIN_MODEL_TYPES


@torch.no_grad()
def logits(model, ids):
    return model(ids).logits


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


@pytest.fixture(params=MAIN_MODEL_TYPES)
def model(request, tiny_model):
    return tiny_model(request.param)


def test_all_softmax_plan_is_the_unpatched_model(model, token_ids):
    before = logits(model, token_ids)
    switcher = PlanSwitcher(model, LINEAR_SETTINGS)
    switcher.apply(LayerPlan.from_string("LNLN"))
    switcher.apply(LayerPlan.uniform("softmax", 4))
    assert max_diff(logits(model, token_ids), before) <= 1e-5
    assert all(layer.self_attn is orig for layer, orig in zip(switcher.layers, switcher.original))


def test_restore_puts_original_modules_back(model, token_ids):
    before = logits(model, token_ids)
    switcher = PlanSwitcher(model, LINEAR_SETTINGS)
    switcher.apply(LayerPlan.from_string("NLNL"))
    switcher.restore()
    assert str(switcher.plan) == "SSSS"
    assert max_diff(logits(model, token_ids), before) <= 1e-5


def test_applying_a_plan_changes_the_modules(model, token_ids):
    switcher = PlanSwitcher(model, LINEAR_SETTINGS)
    softmax = logits(model, token_ids)
    switcher.apply(LayerPlan.from_string("SLNS"))
    assert isinstance(switcher.layers[1].self_attn, LinearSlidingWindowAttention)
    assert isinstance(switcher.layers[2].self_attn, NoAttention)
    assert switcher.layers[0].self_attn is switcher.original[0]
    assert str(switcher.plan) == "SLNS"
    switcher.apply(LayerPlan.uniform("none", 4))
    assert max_diff(logits(model, token_ids), softmax) > 1e-3
    switcher.apply(LayerPlan.uniform("linear", 4))  # window 4 < 16 tokens: linear differs from softmax
    assert max_diff(logits(model, token_ids), softmax) > 1e-4


@pytest.mark.parametrize("layer", [0, 2, 3])
def test_none_equals_zeroing_the_attention_output(model, token_ids, layer):
    def zero_output(module, args, kwargs, output):
        return (torch.zeros_like(output[0]),) + tuple(output[1:])

    attn = model.model.layers[layer].self_attn
    handle = attn.register_forward_hook(zero_output, with_kwargs=True)
    expected = logits(model, token_ids)
    handle.remove()
    switcher = PlanSwitcher(model, LINEAR_SETTINGS)
    plan = ["softmax"] * 4
    plan[layer] = "none"
    switcher.apply(LayerPlan(tuple(plan)))
    assert max_diff(logits(model, token_ids), expected) <= 1e-5
    switcher.restore()
    assert max_diff(logits(model, token_ids), expected) > 1e-4  # the hook really removed something


def test_switching_back_and_forth_is_deterministic(model, token_ids):
    switcher = PlanSwitcher(model, LINEAR_SETTINGS)
    plan_a, plan_b = LayerPlan.from_string("SLNL"), LayerPlan.from_string("LSSN")
    switcher.apply(plan_a)
    a1 = logits(model, token_ids)
    switcher.apply(plan_b)
    b1 = logits(model, token_ids)
    switcher.apply(plan_a)
    a2 = logits(model, token_ids)
    switcher.apply(plan_b)
    b2 = logits(model, token_ids)
    assert torch.equal(a1, a2) and torch.equal(b1, b2)
    assert max_diff(a1, b1) > 1e-4


def test_apply_refuses_wrong_length(model):
    switcher = PlanSwitcher(model, LINEAR_SETTINGS)
    with pytest.raises(UserError, match=r"^plan: has 3 layers but the model has 4$"):
        switcher.apply(LayerPlan.from_string("SLN"))
    assert str(switcher.plan) == "SSSS"  # nothing half-applied
    assert all(layer.self_attn is orig for layer, orig in zip(switcher.layers, switcher.original))


def test_apply_reuses_modules_instead_of_rebuilding(model):
    switcher = PlanSwitcher(model, LINEAR_SETTINGS)
    switcher.apply(LayerPlan.from_string("LNLN"))
    first = [layer.self_attn for layer in switcher.layers]
    switcher.apply(LayerPlan.uniform("softmax", 4))
    switcher.apply(LayerPlan.from_string("LNLN"))
    assert all(layer.self_attn is module for layer, module in zip(switcher.layers, first))
    assert switcher.module(0, "linear") is first[0]
    assert switcher.module(0, "softmax") is switcher.original[0]


def test_linear_module_shares_projections_with_the_original(model):
    switcher = PlanSwitcher(model, LINEAR_SETTINGS)
    linear = switcher.module(1, "linear")
    original = switcher.original[1]
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert getattr(linear, name) is getattr(original, name)
    assert linear.window == 4
    assert linear.learned.feature_q.weight.shape[-1] == 8
    assert linear.layer_idx == 1


def test_load_bank_sets_learned_parts(model, token_ids):
    switcher = PlanSwitcher(model, LINEAR_SETTINGS)
    switcher.apply(LayerPlan.uniform("linear", 4))
    before = logits(model, token_ids)
    parts = []
    for part in switcher.trainable_parts("linear"):
        state = {name: t.clone() for name, t in part.state_dict().items()}
        state["gate_logit"] = torch.full_like(state["gate_logit"], 3.0)  # mostly the exact window
        parts.append(state)

    class Bank:  # the bank protocol PlanSwitcher relies on: option -> per-layer state dicts
        pass

    bank = Bank()
    bank.parts = {"linear": parts}
    switcher.load_bank(bank)
    for part in switcher.trainable_parts("linear"):
        assert torch.equal(part.gate_logit, torch.full_like(part.gate_logit, 3.0))
    assert max_diff(logits(model, token_ids), before) > 1e-5


def test_options_first_applied_in_inference_mode_stay_trainable(model, token_ids):
    # The search times uniform plans (inference mode) before the bank is trained on the same modules.
    switcher = PlanSwitcher(model, LINEAR_SETTINGS)
    with torch.inference_mode():
        switcher.apply(LayerPlan.uniform("linear", 4))
        model(token_ids)
    for part in switcher.trainable_parts("linear"):
        for parameter in part.parameters():
            assert not parameter.is_inference()
            parameter.requires_grad_(True)
