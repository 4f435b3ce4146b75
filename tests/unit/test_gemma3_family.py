"""What the Gemma 3 adapter adds over the shared family tests: local and global layers (kinds, RoPE, sliding
window) survive patching, attention transfer sees each layer's own RoPE, and softcapping is refused."""
from __future__ import annotations

import pytest
import torch

from layerboost_core.inference.linear_attention import LinearSlidingWindowAttention
from layerboost_core.cache import HybridCache
from layerboost_core.errors import UserError
from layerboost_core.families import family_of, layer_kinds
from layerboost_core.models import tiny_config
from layerboost_core.patch import PlanSwitcher
from layerboost_core.plan import LayerPlan
from layerboost_core.transfer import frozen_qkv, replacement_output, teacher_pass

GEMMA3 = "gemma3_text"
WINDOW = tiny_config(GEMMA3).sliding_window  # 8: shorter than the sequences below, so local layers slide
SETTINGS = {"linear": {"window": 4, "feature_dim": 8, "sinks": 2}}


def ids(length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 1000, (2, length), generator=torch.Generator().manual_seed(seed))


def test_layer_kinds_follow_the_config(tiny_model):
    assert layer_kinds(tiny_model(GEMMA3)) == [f"local:{WINDOW}", "global", f"local:{WINDOW}", "global"]
    assert layer_kinds(tiny_model("llama")) == ["global"] * 4


def test_local_and_global_layers_get_different_rope(tiny_model):
    model = tiny_model(GEMMA3)
    hidden, positions = torch.zeros(1, 6, model.config.hidden_size), torch.arange(6).unsqueeze(0)
    local_cos, _ = family_of(model).position_embeddings(model, hidden, positions, 0)
    global_cos, _ = family_of(model).position_embeddings(model, hidden, positions, 1)
    assert not torch.allclose(local_cos, global_cos)


def test_softcapping_is_refused():
    config = tiny_config(GEMMA3)
    config.attn_logit_softcapping = 50.0
    with pytest.raises(UserError, match=r"^model family: gemma3_text with attn_logit_softcapping=50.0 is not"):
        family_of(config)


@torch.no_grad()
def test_softmax_plan_keeps_each_layers_sliding_window(tiny_model):
    """All-softmax through the switcher is the original model; local layers really slide at this length."""
    model = tiny_model(GEMMA3)
    tokens = ids(3 * WINDOW)
    expected = model(tokens).logits
    switcher = PlanSwitcher(model, SETTINGS)
    switcher.apply(LayerPlan.from_string("LLLL"))
    switcher.apply(LayerPlan.from_string("SSSS"))
    assert torch.equal(model(tokens).logits, expected)
    model.config.sliding_window = 10 ** 6  # negative control: without the window the logits change
    model.model.config.sliding_window = 10 ** 6
    assert not torch.allclose(model(tokens).logits, expected, atol=1e-4)


@torch.no_grad()
def test_transfer_capture_gives_each_layer_its_own_rope(tiny_model):
    """On teacher inputs no longer than the window, a `linear` module whose window covers them reproduces every
    layer's output exactly, local and global alike, only with that layer's RoPE."""
    model = tiny_model(GEMMA3)
    switcher = PlanSwitcher(model, {"linear": {"window": WINDOW, "feature_dim": 8}})
    capture = teacher_pass(switcher, ids(WINDOW))
    for index in range(switcher.num_layers):
        module = switcher.module(index, "linear")
        assert isinstance(module, LinearSlidingWindowAttention)
        out = replacement_output(module, frozen_qkv(module, capture.inputs[index], capture.position_embeddings[index]))
        assert (out - capture.outputs[index]).abs().max().item() <= 1e-5


@torch.no_grad()
@pytest.mark.parametrize("plan", ["SSSS", "LSLS", "SLNL", "NSLS", "LLLL"])
def test_cached_decoding_equals_recomputation(tiny_model, plan):
    """Prefill past the local window, then decode: local softmax layers keep a sliding cache, global ones a full
    one, linear ones their state; the logits equal recomputing the whole sequence each step."""
    model = tiny_model(GEMMA3)
    PlanSwitcher(model, SETTINGS).apply(LayerPlan.from_string(plan))
    tokens = ids(WINDOW + 3)
    cache = HybridCache(model)
    cached = [model(tokens, cache=cache).logits[:, -1]]
    recomputed = [model(tokens, use_cache=False).logits[:, -1]]
    for _ in range(WINDOW):
        step = cached[-1].argmax(-1, keepdim=True)
        tokens = torch.cat([tokens, step], dim=1)
        cached.append(model(step, cache=cache).logits[:, -1])
        recomputed.append(model(tokens, use_cache=False).logits[:, -1])
    assert (torch.stack(cached) - torch.stack(recomputed)).abs().max().item() <= 1e-4
