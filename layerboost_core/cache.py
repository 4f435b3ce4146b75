"""Hybrid generation cache for a patched model: each layer keeps exactly what its option needs, nothing more.

    softmax  the full K/V of every token seen (a transformers `DynamicLayer`, as the unpatched model keeps)
    linear   the `LinearState`: sinks' and last W tokens' K/V plus the constant-size linear sums
    mixed<k> the k kept KV heads' K/V as softmax keeps them, plus the other heads' `LinearState`
    none     nothing

`HybridCache(model)` reads the options from the modules a `PlanSwitcher` put in place, so it works for any
plan, with manual cached forward passes (`model(ids, cache=cache)`) and with `model.generate(cache=...)`.
It is `inference.hybrid_cache.LayerBoostCache` (the cache exported folders ship) built from the plan in place.
"""
from __future__ import annotations

import torch

from .errors import UserError
from .families import family_of
from .inference.hybrid_cache import LayerBoostCache
from .inference.linear_attention import LinearSlidingWindowAttention
from .inference.linear_kernels import LinearState
from .inference.mixed_attention import MixedHeadAttention, mixed_option
from .inference.no_attention import NoAttention
from .plan import LayerPlan


def applied_plan(model) -> LayerPlan:
    """The plan a model's decoder layers currently run, read from their attention modules."""
    def option(attn) -> str:
        if isinstance(attn, LinearSlidingWindowAttention):
            return "linear"
        if isinstance(attn, MixedHeadAttention):
            return mixed_option(len(attn.kept_heads))
        if isinstance(attn, NoAttention):
            return "none"
        return "softmax"

    return LayerPlan(tuple(option(layer.self_attn) for layer in family_of(model).decoder_layers(model)))


class HybridCache(LayerBoostCache):
    """A `LayerBoostCache` for a model patched with any plan (see the module docstring).

    `plan`: the plan the model runs; by default read from its modules. Passing a plan that differs from the
    modules in place is refused, since the cache would then hold the wrong things.
    """

    def __init__(self, model, plan: LayerPlan | None = None):
        current = applied_plan(model)
        if plan is not None and plan != current:
            raise UserError(f"plan: the cache was asked for {plan} but the model runs {current}; apply it first")
        super().__init__(model.config, current.layers)
        self.plan = current


@torch.inference_mode()
def hybrid_generate(model, input_ids: torch.Tensor, max_new_tokens: int, plan: LayerPlan | None = None,
                    **generate_kwargs) -> tuple[torch.Tensor, HybridCache]:
    """Greedy `model.generate` with a `HybridCache` for the plan in place; returns (all token ids, the cache).

    `input_ids` must be unpadded (`linear` layers do not read a padding mask).
    """
    cache = HybridCache(model, plan)
    generate_kwargs.setdefault("do_sample", False)
    ids = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), cache=cache,
                         max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                         pad_token_id=model.config.pad_token_id, **generate_kwargs)
    return ids, cache


def stack_caches(caches: list[HybridCache]) -> HybridCache:
    """One cache holding the sequences of `caches` (same plan, same length each) along the batch, in order: what
    a batched server holds after prefilling its requests one at a time. Built in the first cache, which it
    returns; the others are left as they were."""
    first = caches[0]
    lengths = {c.get_seq_length() for c in caches}
    if any(c.options != first.options for c in caches) or len(lengths) != 1:
        raise ValueError("stack_caches: every cache must hold the same plan and the same number of tokens")
    for index, layer in enumerate(first.layers):
        if getattr(layer, "keys", None) is not None:  # softmax (full or sliding) and mixed layers' kept heads
            layer.keys = torch.cat([c.layers[index].keys for c in caches])
            layer.values = torch.cat([c.layers[index].values for c in caches])
        if index in first.linear_states:  # linear layers and mixed layers' linear heads
            states = [c.linear_states[index] for c in caches]
            first.linear_states[index] = LinearState(*(torch.cat(parts) for parts in zip(*(s.tensors() for s in states))),
                                                     states[0].position)
    return first
