"""Family adapters: unsupported families are refused; project_qkv reproduces each family's own attention."""
from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config

from layerboost_core.inference.linear_attention import LinearSlidingWindowAttention
from layerboost_core.errors import UserError
from layerboost_core.families import FAMILIES, family_of
from layerboost_core.models import tiny_config

from ..conftest import MODEL_TYPES


def test_family_of_refuses_unsupported_model_type():
    supported = ", ".join(sorted(FAMILIES))
    with pytest.raises(UserError, match=rf"^model family: 'gpt2' is not supported; supported families: {supported}$"):
        family_of(GPT2Config())


def test_supported_families_are_listed():
    assert {"llama", "qwen2", "qwen3", "mistral"} <= set(FAMILIES)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_family_of_accepts_model_and_config(model_type, tiny_model):
    config = tiny_config(model_type, 2)
    model = tiny_model(model_type)
    assert family_of(config).model_type == model_type
    assert family_of(model) is family_of(config)
    assert len(family_of(model).decoder_layers(model)) == 4


def test_only_qwen3_normalises_q_and_k():
    assert FAMILIES.get("qwen3").qk_norm
    assert not any(FAMILIES.get(name).qk_norm for name in ("llama", "qwen2", "mistral"))


def attention_inputs(model, seq: int, layer: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2, seq, model.config.hidden_size, generator=g)
    positions = torch.arange(seq).unsqueeze(0)
    return hidden, family_of(model).position_embeddings(model, hidden, positions, layer)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
@pytest.mark.parametrize("layer", [0, 3])
@torch.no_grad()
def test_linear_with_window_covering_sequence_reproduces_original_attention(model_type, layer, tiny_model):
    """With no token older than the window, linear attention is exact causal softmax, so any mismatch is in
    project_qkv (projections, q/k norms, RoPE, GQA, scaling)."""
    model = tiny_model(model_type)
    attn = model.model.layers[layer].self_attn
    hidden, position_embeddings = attention_inputs(model, seq=12, layer=layer)
    expected, _ = attn(hidden_states=hidden, position_embeddings=position_embeddings, attention_mask=None)
    linear = LinearSlidingWindowAttention(attn, window=12, feature_dim=8, qk_norm=family_of(model).qk_norm)
    got, second = linear(hidden_states=hidden, position_embeddings=position_embeddings, attention_mask=None)
    assert second is None
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-5


@torch.no_grad()
def test_qwen3_check_is_sensitive_to_qk_norm(tiny_model):
    """Negative control: dropping q/k norms for qwen3 must break the equality above."""
    model = tiny_model("qwen3")
    attn = model.model.layers[1].self_attn
    hidden, position_embeddings = attention_inputs(model, seq=12, layer=1)
    expected, _ = attn(hidden_states=hidden, position_embeddings=position_embeddings, attention_mask=None)
    linear = LinearSlidingWindowAttention(attn, window=12, feature_dim=8, qk_norm=False)
    got, _ = linear(hidden_states=hidden, position_embeddings=position_embeddings, attention_mask=None)
    assert (got - expected).abs().max().item() > 1e-4


@pytest.mark.parametrize("model_type", ["llama", "qwen3", "gemma3_text"])
@torch.no_grad()
def test_project_qkv_shapes(model_type, tiny_model):
    model = tiny_model(model_type)
    attn = model.model.layers[0].self_attn
    hidden, position_embeddings = attention_inputs(model, seq=5, layer=0)
    q, k, v = family_of(model).project_qkv(attn, hidden, position_embeddings)
    cfg = model.config
    assert q.shape == (2, cfg.num_attention_heads, 5, cfg.head_dim)
    assert k.shape == v.shape == (2, cfg.num_key_value_heads, 5, cfg.head_dim)
