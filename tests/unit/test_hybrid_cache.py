"""HybridCache: cached decoding equals recomputing the whole sequence, for every option alone and together
(`mixed1` layers included), and the cache holds exactly the bytes the cost model charges."""
from __future__ import annotations

import pytest
import torch

from layerboost_core.cache import HybridCache, applied_plan, hybrid_generate
from layerboost_core.errors import UserError
from layerboost_core.patch import PlanSwitcher
from layerboost_core.plan import LayerPlan
from layerboost_surrogates.cost_model import kv_bytes_per_sequence

# Window 4 + 2 sinks: an 11-token prompt already slides the window; a 3-token prompt starts inside it and
# the decode steps move past it. `mixed1` layers keep one of the two KV heads softmax.
SETTINGS = {"linear": {"window": 4, "feature_dim": 8, "sinks": 2}, "mixed1": {"kept_heads": [[1], [0], [0], [1]]}}
PLANS = ("SSSS", "LLLL", "NNNN", "SLNL", "NLSN", "LSLS", "1111", "1SN1", "L1S1")
FAMILIES = ("llama", "qwen2", "qwen3")
BATCH = 2


def prompt(length: int, batch: int = BATCH) -> torch.Tensor:
    return torch.randint(3, 1000, (batch, length), generator=torch.Generator().manual_seed(length))


def patched(tiny_model, model_type: str, plan: str):
    model = tiny_model(model_type)
    switcher = PlanSwitcher(model, SETTINGS)
    switcher.apply(LayerPlan.from_string(plan))
    return model


@torch.no_grad()
def cached_greedy(model, ids: torch.Tensor, steps: int):
    """Prefill into a HybridCache, then `steps` one-token cached forwards; (tokens, last-position logits, cache)."""
    cache = HybridCache(model)
    logits = [model(ids, cache=cache).logits[:, -1]]
    tokens = ids
    for _ in range(steps):
        next_token = logits[-1].argmax(-1, keepdim=True)
        tokens = torch.cat([tokens, next_token], dim=1)
        logits.append(model(next_token, cache=cache).logits[:, -1])
    return tokens, torch.stack(logits, dim=1), cache


@torch.no_grad()
def recomputed_greedy(model, ids: torch.Tensor, steps: int):
    """The same greedy loop without any cache: the whole sequence is recomputed every step."""
    tokens, logits = ids, []
    for _ in range(steps + 1):
        logits.append(model(tokens, use_cache=False).logits[:, -1])
        if len(logits) <= steps:
            tokens = torch.cat([tokens, logits[-1].argmax(-1, keepdim=True)], dim=1)
    return tokens, torch.stack(logits, dim=1)


@pytest.mark.parametrize("model_type", FAMILIES)
@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize("prompt_length", [3, 11])
def test_cached_decoding_equals_recomputation(tiny_model, model_type, plan, prompt_length):
    model = patched(tiny_model, model_type, plan)
    ids = prompt(prompt_length)
    tokens, logits, cache = cached_greedy(model, ids, steps=6)
    expected_tokens, expected_logits = recomputed_greedy(model, ids, steps=6)
    assert torch.equal(tokens, expected_tokens)
    assert (logits - expected_logits).abs().max().item() <= 1e-4
    assert cache.get_seq_length() == (0 if plan == "NNNN" else tokens.shape[1])


@pytest.mark.parametrize("model_type", FAMILIES)
@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize("context", [3, 5, 6, 17])
def test_kv_bytes_match_the_cost_model(tiny_model, model_type, plan, context):
    model = patched(tiny_model, model_type, plan)
    cache = HybridCache(model)
    with torch.no_grad():
        model(prompt(min(context, 3)), cache=cache)  # short prefill, the rest decoded token by token
        rest = prompt(context)
        for position in range(3, context):
            model(rest[:, position:position + 1], cache=cache)
    expected = kv_bytes_per_sequence(LayerPlan.from_string(plan), model.config, SETTINGS, context, 4) * BATCH
    assert cache.kv_bytes() == expected


def test_kv_bytes_per_layer_follow_the_options(tiny_model):
    model = patched(tiny_model, "llama", "SLN1")
    cache = HybridCache(model)
    with torch.no_grad():
        model(prompt(40), cache=cache)
    softmax, linear, none, mixed = cache.layer_bytes()
    assert softmax == 2 * BATCH * 2 * 16 * 40 * 4  # K and V, 2 kv heads, head_dim 16, fp32
    assert 0 < linear < softmax and none == 0
    # mixed1: the kept head's K/V (every token) and the other head's linear state, nothing else
    assert cache.layers[3].keys.shape == (BATCH, 1, 40, 16) and cache.linear_states[3].values.shape[1] == 1
    assert mixed == softmax // 2 + linear // 2
    assert cache.is_linear == [False, True, False, False]
    with torch.no_grad():
        model(prompt(1), cache=cache)
    assert cache.layer_bytes()[1] == linear  # constant size once the window is full


def test_a_prompt_fed_in_two_chunks_equals_one_prefill(tiny_model):
    model = patched(tiny_model, "qwen3", "LSNL")
    ids = prompt(13)
    with torch.no_grad():
        expected = model(ids).logits[:, -5:]
        cache = HybridCache(model)
        model(ids[:, :8], cache=cache)
        chunked = model(ids[:, 8:], cache=cache).logits
    assert (chunked - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize("model_type", FAMILIES)
@pytest.mark.parametrize("plan", ["SLNL", "LLLL", "NNNN", "SSSS", "1SN1"])
def test_generate_matches_a_no_cache_greedy_loop(tiny_model, model_type, plan):
    model = patched(tiny_model, model_type, plan)
    ids = prompt(9)
    generated, cache = hybrid_generate(model, ids, max_new_tokens=6)
    expected, _ = recomputed_greedy(model, ids, steps=6)
    assert torch.equal(generated, expected)
    assert isinstance(cache, HybridCache)
    if plan != "NNNN":  # generate does not feed its last token back: the cache has seen one token less
        assert cache.get_seq_length() == expected.shape[1] - 1


@pytest.mark.parametrize("plan", ["LSNL", "1SN1"])
def test_generate_accepts_the_cache_directly_and_beam_search_reorders_it(tiny_model, plan):
    model = patched(tiny_model, "llama", plan)
    ids = prompt(9, batch=1)
    with torch.no_grad():
        cached = model.generate(ids, attention_mask=torch.ones_like(ids), cache=HybridCache(model), num_beams=2,
                                do_sample=False, max_new_tokens=5, min_new_tokens=5, pad_token_id=2)
        recomputed = model.generate(ids, attention_mask=torch.ones_like(ids), use_cache=False, num_beams=2,
                                    do_sample=False, max_new_tokens=5, min_new_tokens=5, pad_token_id=2)
    assert torch.equal(cached, recomputed)


def test_the_cache_follows_the_applied_plan_and_refuses_another(tiny_model):
    model = patched(tiny_model, "llama", "SLNL")
    assert str(applied_plan(model)) == "SLNL"
    assert HybridCache(model, LayerPlan.from_string("SLNL")).is_linear == [False, True, False, True]
    with pytest.raises(UserError, match=r"^plan: the cache was asked for SSSS but the model runs SLNL"):
        HybridCache(model, LayerPlan.from_string("SSSS"))


@pytest.mark.parametrize("plan", ["LSSS", "1SSS"])
def test_linear_state_cannot_be_cropped(tiny_model, plan):
    model = patched(tiny_model, "llama", plan)
    cache = HybridCache(model)
    with torch.no_grad():
        model(prompt(6), cache=cache)
    assert not cache.is_croppable
    with pytest.raises(NotImplementedError):
        cache.crop(-1)
    cache.reset()
    assert cache.kv_bytes() == 0 and cache.get_seq_length() == 0


@pytest.mark.parametrize("plan", ["SSSS", "SLNS", "1S1N", "11LS"])
def test_kv_bytes_of_sliding_window_layers_match_the_cost_model(tiny_model, plan):
    """Gemma 3's local softmax layers keep only their window (the tiny config: window 8, local/global
    alternating), and so do the kept heads of its local mixed layers: the cost model prices each layer by its
    kind, as the hybrid cache stores it."""
    model = patched(tiny_model, "gemma3_text", plan)
    context = 17
    cache = HybridCache(model)
    with torch.no_grad():
        model(prompt(3), cache=cache)
        rest = prompt(context)
        for position in range(3, context):
            model(rest[:, position:position + 1], cache=cache)
    expected = kv_bytes_per_sequence(LayerPlan.from_string(plan), model.config, SETTINGS, context, 4) * BATCH
    assert cache.kv_bytes() == expected
    every_layer_global = sum(kv_bytes_per_sequence(LayerPlan((o,)), model.config, SETTINGS, context, 4)
                             for o in LayerPlan.from_string(plan).layers) * BATCH
    assert expected < every_layer_global  # the local layers' saving is counted


@pytest.mark.parametrize("plan", ["1S1N", "11LS"])
@pytest.mark.parametrize("prompt_length", [3, 11])
def test_cached_decoding_of_sliding_mixed_layers_equals_recomputation(tiny_model, plan, prompt_length):
    """Gemma 3's local mixed layers: the kept heads stay sliding (window 8) in prefill and in the cache."""
    model = patched(tiny_model, "gemma3_text", plan)
    ids = prompt(prompt_length)
    tokens, logits, _ = cached_greedy(model, ids, steps=8)
    expected_tokens, expected_logits = recomputed_greedy(model, ids, steps=8)
    assert torch.equal(tokens, expected_tokens)
    assert (logits - expected_logits).abs().max().item() <= 1e-4
