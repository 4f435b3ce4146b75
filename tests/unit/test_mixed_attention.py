"""`mixed1` / `mixed2`: kept KV heads are the original softmax attention (sliding where the layer slides), the
other heads are the `linear` option on those heads with the layer's own learned parts; settings are refused in
one line; the module shares the `linear` module's parts, so the bank serves it. (Cached decoding and KV bytes:
test_hybrid_cache.py; exported folders: test_export.py; the option contract: tests/contract.)"""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from layerboost_core.attention import OPTIONS, bank_option
from layerboost_core.attention.naive import mixed_heads_reference, softmax_reference
from layerboost_core.errors import UserError
from layerboost_core.families import family_of
from layerboost_core.inference.mixed_attention import MixedHeadAttention
from layerboost_core.models import tiny_config
from layerboost_core.patch import PlanSwitcher
from layerboost_core.plan import LayerPlan
from layerboost_core.workbench import needs_bank
from layerboost_surrogates.cost_model import kv_bytes_per_sequence

LINEAR = {"window": 4, "feature_dim": 8, "sinks": 2}
SETTINGS = {"linear": LINEAR, "mixed1": {"kept_heads": [[1], [0], [1], [0]]}}
SEQ = 19  # past the linear window (4) and Gemma 3's local window (8)


def switcher_with_trained_parts(model, settings=SETTINGS) -> PlanSwitcher:
    """A switcher whose `linear` parts are away from their init (gates off 0.5, maps off the identity)."""
    switcher = PlanSwitcher(model, settings)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(3)
        for part in switcher.trainable_parts("linear"):
            for parameter in part.parameters():
                parameter.add_(0.5 * torch.randn_like(parameter))
    return switcher


def qkv(model, module, layer: int, seq: int = SEQ):
    g = torch.Generator().manual_seed(layer)
    hidden = torch.randn(2, seq, model.config.hidden_size, generator=g)
    positions = torch.arange(seq).unsqueeze(0)
    position_embeddings = family_of(model).position_embeddings(model, hidden, positions, layer)
    return module.project_qkv(hidden, position_embeddings)


def sliding_mask(seq: int, window: int) -> torch.Tensor:
    """transformers' sliding causal mask (True: attend): the last `window` keys, the query's own included."""
    i, j = torch.arange(seq).view(seq, 1), torch.arange(seq).view(1, seq)
    return ((j <= i) & (j > i - window)).view(1, 1, seq, seq)


@torch.no_grad()
@pytest.mark.parametrize("model_type, layer", [("llama", 1), ("qwen3", 2), ("gemma3_text", 1), ("gemma3_text", 0)])
@pytest.mark.parametrize("kept", [[0], [1]])
def test_prefill_equals_the_reference(tiny_model, model_type, layer, kept):
    model = tiny_model(model_type)
    linear = switcher_with_trained_parts(model).module(layer, "linear")
    mixed = MixedHeadAttention(linear, kept)
    q, k, v = qkv(model, linear, layer)
    local = (getattr(model.config, "layer_types", None) or [None] * 4)[layer] == "sliding_attention"
    window = model.config.sliding_window if local else None
    mask = sliding_mask(SEQ, window) if window else None  # what the decoder layer hands a local layer
    learned = linear.learned
    expected = mixed_heads_reference(q, k, v, learned.feature_q(q), learned.feature_k(k), learned.gate(), kept,
                                     LINEAR["window"], linear.scaling, LINEAR["sinks"], sliding_window=window)
    assert (mixed.attend(q, k, v, mask) - expected).abs().max().item() <= 1e-5


@torch.no_grad()
@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_each_part_is_its_option_on_its_heads(tiny_model, model_type):
    """No kept head: the `linear` module exactly; every head kept: softmax; one kept: the linear module's rows
    for the other KV head's query group, softmax rows for the kept one."""
    model = tiny_model(model_type)
    linear = switcher_with_trained_parts(model).module(1, "linear")
    q, k, v = qkv(model, linear, 1)
    everything_linear = linear.attend(q, k, v)
    softmax = softmax_reference(q, k, v, linear.scaling)
    assert (MixedHeadAttention(linear, []).attend(q, k, v) - everything_linear).abs().max().item() <= 1e-6
    assert (MixedHeadAttention(linear, [0, 1]).attend(q, k, v) - softmax).abs().max().item() <= 1e-6
    one = MixedHeadAttention(linear, [1]).attend(q, k, v)  # 4 query heads, 2 per KV head: rows 0-1 are linear
    assert (one[:, :2] - everything_linear[:, :2]).abs().max().item() <= 1e-6
    assert (one[:, 2:] - softmax[:, 2:]).abs().max().item() <= 1e-6


@torch.no_grad()
def test_every_head_kept_is_the_original_model_sliding_windows_included(tiny_model):
    """Installed in Gemma 3's local and global layers, a module keeping every head gives the original logits:
    the kept heads take the mask each decoder layer hands its attention (local layers: window 8 < 19 tokens)."""
    model = tiny_model("gemma3_text")
    ids = torch.randint(3, 1000, (2, SEQ), generator=torch.Generator().manual_seed(0))
    expected = model(ids, use_cache=False).logits
    switcher = PlanSwitcher(model, SETTINGS)
    for index, layer in enumerate(switcher.layers):
        layer.self_attn = MixedHeadAttention(switcher.module(index, "linear"), [0, 1])
    assert (model(ids, use_cache=False).logits - expected).abs().max().item() <= 1e-4


def test_the_module_shares_the_linear_parts_and_projections(tiny_model):
    model = tiny_model("llama")
    switcher = PlanSwitcher(model, SETTINGS)
    mixed, linear = switcher.module(1, "mixed1"), switcher.module(1, "linear")
    assert mixed.learned is linear.learned and mixed.q_proj is switcher.original[1].q_proj
    assert mixed.kept_heads == (0,) and mixed.linear_heads == (1,)
    switcher.apply(LayerPlan.from_string("S1SS"))
    ids = torch.randint(3, 1000, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
        for part in switcher.trainable_parts("linear"):  # what loading a bank into the switcher does
            part.load_state_dict({name: t + 0.3 for name, t in part.state_dict().items()})
        assert not torch.allclose(model(ids).logits, before)


def test_a_mixed_plan_or_space_needs_the_bank():
    assert [bank_option(name) for name in ("softmax", "linear", "mixed1", "mixed2", "none")] == \
        [None, "linear", "linear", "linear", None]
    assert needs_bank(["softmax", "mixed1", "none"]) and needs_bank(("mixed2",))
    assert not needs_bank(["softmax", "none"])
    assert (OPTIONS.get("mixed1").code, OPTIONS.get("mixed2").code) == ("1", "2")
    assert str(LayerPlan.from_string("S1L2N")) == "S1L2N"


@pytest.mark.parametrize("kept_heads, message", [
    (None, "missing"),
    ([[0]] * 3, "3 entries for a model of 4 layers"),
    ("0,1", "'0,1' for a model of 4 layers"),
    ([[0], [0, 1], [0], [0]], "layer 1 has [0, 1]"),
    ([[0], [1], [2], [0]], "layer 2 has [2]"),
    ([[0], [1], [-1], [0]], "layer 2 has [-1]"),
    ([[0], [1], [0], 1], "layer 3 has 1"),
])
def test_malformed_kept_heads_are_refused_in_one_line(tiny_model, kept_heads, message):
    settings = {"linear": LINEAR, "mixed1": {} if kept_heads is None else {"kept_heads": kept_heads}}
    switcher = PlanSwitcher(tiny_model("llama"), settings)
    allowed = "allowed: a list of 4 lists (one per layer) of 1 distinct KV head index in 0..1"
    with pytest.raises(UserError) as error:
        switcher.apply(LayerPlan.from_string("S1SS"))
    assert str(error.value) == f"attention.mixed1.kept_heads: {message}; {allowed}"


def test_mixed2_duplicates_are_refused():
    from layerboost_core.attention.mixed import check_kept_heads

    with pytest.raises(UserError, match=r"^attention\.mixed2\.kept_heads: layer 0 has \[1, 1\]; allowed: a list "
                                        r"of 2 lists \(one per layer\) of 2 distinct KV head indices in 0\.\.3$"):
        check_kept_heads("mixed2", {"kept_heads": [[1, 1], [0, 2]]}, kv_heads=4, num_layers=2)
    assert check_kept_heads("mixed2", {"kept_heads": [[3, 1], [0, 2]]}, kv_heads=4, num_layers=2) == [[3, 1], [0, 2]]


def test_a_model_with_one_kv_head_is_refused():
    """Gemma 3 270M (and 1B) have one KV head per layer: there is nothing to mix."""
    config = tiny_config("gemma3_text")
    config.num_key_value_heads = 1
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    switcher = PlanSwitcher(model, {"linear": LINEAR, "mixed1": {"kept_heads": [[0]] * 4}})
    with pytest.raises(UserError, match=r"^attention\.mixed1: keeps 1 KV head of each layer softmax and turns the "
                                        r"others `linear`, so it needs a model with at least 2 KV heads; this "
                                        r"model has 1$"):
        switcher.apply(LayerPlan.from_string("1SSS"))


@pytest.mark.parametrize("context", [3, 40])
def test_kv_bytes_of_a_mixed_layer_are_its_kept_heads_and_the_others_state(tiny_model, context):
    config = tiny_model("llama").config  # 2 KV heads of 16 dims
    one = {o: kv_bytes_per_sequence(LayerPlan((o,)), config, SETTINGS, context, 2) for o in ("softmax", "linear")}
    assert kv_bytes_per_sequence(LayerPlan(("mixed1",)), config, SETTINGS, context, 2) == \
        one["softmax"] // 2 + one["linear"] // 2 == 2 * 16 * context * 2 + one["linear"] // 2
