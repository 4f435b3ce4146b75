"""`mixed1` / `mixed2` (codes `1`, `2`): per layer, k KV heads (with their query groups) keep softmax attention
and the other KV heads become `linear`. Retrieval lives in a few heads, not layers.

The module (`MixedHeadAttention`) lives in `inference/mixed_attention.py`, which exported folders ship; this
file registers the options and validates their settings. A mixed layer builds on the same layer's `linear`
module (`builds_on`): the same projections and learned parts, restricted to the linear heads, so the bank
serves it. Its one setting, `attention.mixed<k>.kept_heads`, lists per layer the k KV heads kept softmax; the
project measures per-head retrieval scores elsewhere and fills it in (there is no default: it is per model).
"""
from __future__ import annotations

import numbers
from collections.abc import Sequence
from functools import partial

from ..errors import UserError
from ..inference.mixed_attention import MIXED_OPTIONS, MixedHeadAttention
from . import AttentionOption, register_option


def check_kept_heads(option: str, settings: dict, kv_heads: int, num_layers: int) -> list[list[int]]:
    """`settings["kept_heads"]` of `option` checked against a model with `kv_heads` KV heads per layer and
    `num_layers` layers: per layer, k distinct KV head indices. Anything else is refused in one line."""
    k = MIXED_OPTIONS[option]
    if kv_heads < k + 1:
        raise UserError(f"attention.{option}: keeps {k} KV head{'s' if k > 1 else ''} of each layer softmax and "
                        f"turns the others `linear`, so it needs a model with at least {k + 1} KV heads; this "
                        f"model has {kv_heads}")
    field = f"attention.{option}.kept_heads"
    allowed = (f"allowed: a list of {num_layers} lists (one per layer) of {k} distinct KV head "
               f"ind{'ices' if k > 1 else 'ex'} in 0..{kv_heads - 1}")
    kept = settings.get("kept_heads")
    if kept is None:
        raise UserError(f"{field}: missing; {allowed}")
    if not _is_list(kept) or len(kept) != num_layers:
        what = f"{len(kept)} entries" if _is_list(kept) else repr(kept)
        raise UserError(f"{field}: {what} for a model of {num_layers} layers; {allowed}")
    for layer, heads in enumerate(kept):
        ok = (_is_list(heads) and len(heads) == k
              and all(isinstance(h, numbers.Integral) and not isinstance(h, bool) and 0 <= h < kv_heads
                      for h in heads) and len(set(heads)) == k)
        if not ok:
            raise UserError(f"{field}: layer {layer} has {heads!r}; {allowed}")
    return [[int(h) for h in heads] for heads in kept]


def _is_list(value) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, (str, bytes))


def build_mixed(attn, family, settings, base, option: str):
    kv_heads = attn.k_proj.out_features // attn.head_dim
    kept = check_kept_heads(option, settings, kv_heads, attn.config.num_hidden_layers)
    return MixedHeadAttention(base, kept[attn.layer_idx])


MIXED = {name: register_option(AttentionOption(name, str(k), partial(build_mixed, option=name), builds_on="linear",
                                               min_kv_heads=k + 1))
         for name, k in MIXED_OPTIONS.items()}
