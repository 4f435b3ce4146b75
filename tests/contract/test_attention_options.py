"""Contract every registered attention option must meet (a new option is tested by registering it).

The module an option builds replaces a decoder layer's `self_attn`: same call, `(output, second)` back,
output shaped like the hidden states, causal, differentiable, and able to continue from a generation cache.
Caches follow one protocol: a transformers `DynamicCache` (softmax layers use it) carrying `linear_states`,
a dict layer -> state that recurrent options fill (see `LinearSlidingWindowAttention.forward`).
An option runs on every contract family whose tiny config has the KV heads it needs (`min_kv_heads`); on the
others it must be refused in one line.
"""
from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from layerboost_core.attention import OPTIONS
from layerboost_core.errors import UserError
from layerboost_core.families import family_of
from layerboost_core.models import tiny_config
from layerboost_core.patch import PlanSwitcher
from layerboost_core.plan import LayerPlan

from ..conftest import CONTRACT_MODEL_TYPES, LINEAR_SETTINGS

LAYER = 1  # not 0, so a module that ignores its own layer index is caught
SEQ = 12  # longer than the linear window (4): every code path of `linear` is exercised

# Settings variants per option (an option with settings lists them here); the others run once. The tiny
# models have 4 layers of 2 KV heads: `mixed1` keeps one of them (LAYER's is the second, then the first).
VARIANTS = {"linear": {"": LINEAR_SETTINGS["linear"], "sinks2": {**LINEAR_SETTINGS["linear"], "sinks": 2}},
            "mixed1": {"keep1": {"kept_heads": [[1]] * 4}, "keep0": {"kept_heads": [[0]] * 4}}}
# Every (option, variant, family) whose tiny config has the KV heads the option needs; the others are refused.
CASES, REFUSED = [], []
for _name in OPTIONS.names():
    for _type in CONTRACT_MODEL_TYPES:
        _fits = tiny_config(_type).num_key_value_heads >= OPTIONS.get(_name).min_kv_heads
        if _fits:
            CASES += [(_name, variant, _type) for variant in VARIANTS.get(_name, {"": None})]
        else:
            REFUSED.append((_name, _type))


@pytest.fixture(params=CASES, ids=[f"{name}{f'-{variant}' if variant else ''}-{t}" for name, variant, t in CASES])
def case(request):
    return request.param


@pytest.fixture
def option(case):
    return case[0]


@pytest.fixture
def settings(case):
    name, variant, _ = case
    return {**LINEAR_SETTINGS, name: VARIANTS[name][variant]} if variant else dict(LINEAR_SETTINGS)


@pytest.fixture
def model_type(case):
    return case[2]


@pytest.fixture
def setup(tiny_model, model_type, option, settings):
    model = tiny_model(model_type)
    switcher = PlanSwitcher(model, settings)
    module = switcher.module(LAYER, option)
    return model, switcher, module


def hidden_states(model, seq: int = SEQ, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, seq, model.config.hidden_size, generator=g)


def call(model, module, hidden, start: int = 0, cache=None):
    """Call `module` the way a decoder layer does, for tokens at positions start .. start + S - 1."""
    positions = torch.arange(start, start + hidden.shape[1]).unsqueeze(0)
    position_embeddings = family_of(model).position_embeddings(model, hidden, positions, module.layer_idx)
    result = module(hidden_states=hidden, position_embeddings=position_embeddings, attention_mask=None,
                    cache=cache)
    assert isinstance(result, tuple) and len(result) == 2
    return result[0]


@pytest.mark.parametrize("name, model_type", REFUSED)
def test_an_option_needing_more_kv_heads_is_refused_in_one_line(tiny_model, name, model_type):
    model = tiny_model(model_type)
    heads = model.config.num_key_value_heads
    switcher = PlanSwitcher(model, {**LINEAR_SETTINGS, name: {"kept_heads": [[0]] * 4}})
    with pytest.raises(UserError, match=rf"^attention\.{name}: .* needs a model with at least "
                                        rf"{OPTIONS.get(name).min_kv_heads} KV heads; this model has {heads}$"):
        switcher.module(LAYER, name)


def test_option_code_is_one_unique_character(option):
    spec = OPTIONS.get(option)
    assert spec.name == option
    assert len(spec.code) == 1 and (spec.code.isupper() or spec.code.isdigit())
    assert sum(OPTIONS.get(n).code == spec.code for n in OPTIONS) == 1
    assert str(LayerPlan((option,))) == spec.code


def test_module_is_built_once(setup, option):
    _, switcher, module = setup
    assert switcher.module(LAYER, option) is module


@torch.no_grad()
def test_output_shape_and_dtype(setup):
    model, _, module = setup
    hidden = hidden_states(model)
    out = call(model, module, hidden)
    assert out.shape == hidden.shape
    assert out.dtype == hidden.dtype
    assert torch.isfinite(out).all()


@torch.no_grad()
@pytest.mark.parametrize("cut", [1, 5, 8])
def test_causal(setup, cut):
    model, _, module = setup
    hidden = hidden_states(model)
    changed = hidden.clone()
    changed[:, cut:] = hidden_states(model, seed=1)[:, cut:]
    base, other = call(model, module, hidden), call(model, module, changed)
    assert torch.allclose(base[:, :cut], other[:, :cut], rtol=0, atol=1e-5)


@torch.no_grad()
def test_batch_rows_are_independent(setup):
    model, _, module = setup
    hidden = hidden_states(model)
    both = call(model, module, hidden)
    first = call(model, module, hidden[:1])
    assert torch.allclose(both[:1], first, rtol=0, atol=1e-5)


def test_gradients_flow_to_hidden_states(setup, option):
    model, _, module = setup
    hidden = hidden_states(model).requires_grad_()
    out = call(model, module, hidden)
    if not out.requires_grad:  # an option that adds nothing must add exactly nothing
        assert torch.equal(out, torch.zeros_like(out))
        return
    (out * hidden_states(model, seed=2)).sum().backward()
    assert hidden.grad is not None
    assert torch.isfinite(hidden.grad).all()
    assert hidden.grad.abs().sum() > 0


def test_trainable_options_own_only_their_learned_parts(setup, option):
    model, switcher, module = setup
    original = {id(p) for p in switcher.original[LAYER].parameters()}
    new = [p for p in module.parameters() if id(p) not in original]
    spec = OPTIONS.get(option)
    if spec.trainable:
        learned = {id(p) for p in module.learned.parameters()}
        assert learned and {id(p) for p in new} == learned
    elif spec.builds_on:  # shares the parts of the module it builds on (the same Parameter objects), no others
        shared = {id(p) for p in switcher.module(LAYER, spec.builds_on).parameters()} - original
        assert {id(p) for p in new} == shared
    else:
        assert not new


@torch.no_grad()
@pytest.mark.parametrize("prefix", [3, 7])
def test_cache_round_trip(setup, prefix):
    """Prefill `prefix` tokens into a cache, then decode the rest one token at a time: equals one full pass."""
    model, _, module = setup
    hidden = hidden_states(model)
    full = call(model, module, hidden)
    cache = DynamicCache(config=model.config)
    cache.linear_states = {}
    outputs = [call(model, module, hidden[:, :prefix], cache=cache)]
    for t in range(prefix, SEQ):
        outputs.append(call(model, module, hidden[:, t:t + 1], start=t, cache=cache))
    assert (torch.cat(outputs, dim=1) - full).abs().max().item() <= 1e-5


@torch.no_grad()
@pytest.mark.parametrize("sinks", [0, 2])
@pytest.mark.parametrize("prefix", [1, 2, 4, 9])
@pytest.mark.parametrize("model_type", CONTRACT_MODEL_TYPES)
def test_linear_attend_state_round_trip(tiny_model, model_type, prefix, sinks):
    model = tiny_model(model_type)
    settings = {"linear": {**LINEAR_SETTINGS["linear"], "sinks": sinks}}
    module = PlanSwitcher(model, settings).module(LAYER, "linear")
    assert module.sinks == sinks
    hidden = hidden_states(model)
    positions = torch.arange(SEQ).unsqueeze(0)
    position_embeddings = family_of(model).position_embeddings(model, hidden, positions, LAYER)
    q, k, v = module.project_qkv(hidden, position_embeddings)
    full = module.attend(q, k, v)
    head, state = module.attend(q[:, :, :prefix], k[:, :, :prefix], v[:, :, :prefix], return_state=True)
    tail, state = module.attend(q[:, :, prefix:], k[:, :, prefix:], v[:, :, prefix:], state, return_state=True)
    assert (torch.cat([head, tail], dim=2) - full).abs().max().item() <= 1e-5
    # Continuing from an explicit empty state is the same as starting fresh.
    fresh = module.attend(q, k, v, module.empty_state(2, like=q))
    assert (fresh - full).abs().max().item() <= 1e-5


@torch.no_grad()
def test_uniform_plan_runs_the_whole_model(tiny_model, token_ids, model_type, option, settings):
    model = tiny_model(model_type)
    switcher = PlanSwitcher(model, settings)
    switcher.apply(LayerPlan.uniform(option, switcher.num_layers))
    logits = model(token_ids).logits
    assert logits.shape == (*token_ids.shape, model.config.vocab_size)
    assert torch.isfinite(logits).all()
