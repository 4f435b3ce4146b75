"""The `mixed1` / `mixed2` options' module: in one layer, k KV heads (with their query groups) keep softmax
attention exactly as the layer's own attention computes it, and the other KV heads become `linear`.

Retrieval lives in a few heads, not layers: keeping those heads softmax keeps what the layer retrieves, while
the others get the `linear` option's constant-size state. Which heads are kept is a setting (`kept_heads`,
per layer the KV head indices; the project measures per-head retrieval scores and fills it in).

    kept heads    torch SDPA over the whole causal context with the mask the decoder layer hands its attention,
                  so a sliding-window layer's kept heads stay sliding; with a cache their K/V go through
                  `cache.update`, as the original's do (the hybrid cache's mixed layer keeps them: growing, or
                  the window of a sliding layer)
    other heads   the `linear` option's math (`linear_attention.attend_linear`: chunked prefill, decode steps)
                  with the layer's own learned parts restricted to them (feature_q rows of their query heads,
                  feature_k rows of those KV heads, their gates); with a cache their `LinearState` lives in
                  `cache.linear_states`, as a `linear` layer's does

The module shares the layer's `linear` module's projections and learned parts (the same Parameter objects: the
bank, loaded into the `linear` modules, serves both). Output heads are put back in the original order before
`o_proj`.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .linear_attention import LinearSlidingWindowAttention, attend_linear
from .qkv import project_qkv

# option name -> KV heads per layer that keep softmax attention (the option's plan code is that number)
MIXED_OPTIONS = {"mixed1": 1, "mixed2": 2}


def mixed_option(kept: int) -> str:
    """The option name of a mixed layer keeping `kept` KV heads softmax."""
    for name, count in MIXED_OPTIONS.items():
        if count == kept:
            return name
    raise ValueError(f"no mixed option keeps {kept} KV heads; options: {MIXED_OPTIONS}")


class MixedHeadAttention(nn.Module):
    """Drop-in replacement for a family's attention module (same call signature, returns (out, None)), built on
    the same layer's `linear` module. `kept_heads`: the KV heads that keep softmax attention (any number from
    none, which is the `linear` module exactly, to all, which is the original attention)."""

    def __init__(self, linear: LinearSlidingWindowAttention, kept_heads: Sequence[int]):
        super().__init__()
        self.layer_idx = linear.layer_idx
        self.head_dim, self.scaling = linear.head_dim, linear.scaling
        self.window, self.sinks, self.qk_norm = linear.window, linear.sinks, linear.qk_norm
        # Shared with the `linear` module and the original attention (same Parameter objects).
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = linear.q_proj, linear.k_proj, linear.v_proj, linear.o_proj
        if linear.qk_norm:
            self.q_norm, self.k_norm = linear.q_norm, linear.k_norm
        self.learned = linear.learned
        kv_heads = self.k_proj.out_features // self.head_dim
        group = self.q_proj.out_features // self.head_dim // kv_heads
        kept = sorted(int(h) for h in kept_heads)
        if len(set(kept)) != len(kept) or any(not 0 <= h < kv_heads for h in kept):
            raise ValueError(f"kept_heads of layer {self.layer_idx} must be distinct KV head indices in "
                             f"0..{kv_heads - 1}, got {list(kept_heads)}")
        self.kept_heads = tuple(kept)
        self.linear_heads = tuple(h for h in range(kv_heads) if h not in kept)

        def query_rows(heads):  # the query heads of each KV head (GQA groups are contiguous)
            return [h * group + r for h in heads for r in range(group)]

        rows = query_rows(self.kept_heads) + query_rows(self.linear_heads)
        # Index lists; their tensors are made per device on first use (`_index`): no buffers, so nothing of this
        # enters the state dict or meets transformers' meta-device initialisation.
        self._index_lists = {"q_kept": query_rows(self.kept_heads), "kv_kept": list(self.kept_heads),
                             "q_linear": query_rows(self.linear_heads), "kv_linear": list(self.linear_heads),
                             "order": sorted(range(len(rows)), key=rows.__getitem__)}
        self._index_tensors: dict = {}

    @classmethod
    def from_settings(cls, attn: nn.Module, settings: dict, option: str, qk_norm: bool) -> "MixedHeadAttention":
        """The module of `option` for `attn`'s layer from a plan's option settings (all options': the `linear`
        ones and `settings[option]["kept_heads"]`, as plan JSON and an exported config store them)."""
        linear = LinearSlidingWindowAttention.from_settings(attn, settings["linear"], qk_norm)
        return cls(linear, settings[option]["kept_heads"][attn.layer_idx])

    def _index(self, device) -> dict[str, torch.Tensor]:
        found = self._index_tensors.get(device)
        if found is None:
            with torch.inference_mode(False):  # normal tensors: usable in and out of inference mode, and in backward
                found = {name: torch.tensor(rows, dtype=torch.long, device=device)
                         for name, rows in self._index_lists.items()}
            self._index_tensors[device] = found
        return found

    def attend(self, q, k, v, attention_mask=None, cache=None) -> torch.Tensor:
        """Post-RoPE q (B, Hq, S, D), k and v (B, Hkv, S, D) -> (B, Hq, S, D), heads in the original order.

        With a cache, the kept heads' K/V are added to it (`cache.update`) and the linear heads continue from
        (and write back) their state in `cache.linear_states` when the cache has that dict."""
        index = self._index(q.device)
        parts = []
        if self.kept_heads:
            parts.append(self._softmax(q.index_select(1, index["q_kept"]), k.index_select(1, index["kv_kept"]),
                                       v.index_select(1, index["kv_kept"]), attention_mask, cache))
        if self.linear_heads:
            heads = (index["q_linear"], index["kv_linear"])
            q, k, v = q.index_select(1, heads[0]), k.index_select(1, heads[1]), v.index_select(1, heads[1])
            states = getattr(cache, "linear_states", None)  # set by the hybrid cache (hybrid_cache.py)
            if states is None:
                parts.append(attend_linear(self.learned, q, k, v, self.window, self.scaling, self.sinks, heads=heads))
            else:
                y, states[self.layer_idx] = attend_linear(self.learned, q, k, v, self.window, self.scaling,
                                                          self.sinks, states.get(self.layer_idx), True, heads)
                parts.append(y)
        y = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)  # (B, Hq, S, D): kept rows, then linear
        return y.index_select(1, index["order"])

    def _softmax(self, q, k, v, attention_mask, cache) -> torch.Tensor:
        """Softmax attention of the kept heads, as the original computes it: q (B, G*k, S, D), k/v (B, k, S, D)."""
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        s, t = q.shape[2], k.shape[2]
        causal = attention_mask is None and s > 1
        if causal and t > s:  # continuing a cache without a mask: SDPA's is_causal would align the first keys
            attention_mask, causal = torch.ones(s, t, dtype=torch.bool, device=q.device).tril(t - s), False
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, is_causal=causal,
                                              scale=self.scaling, enable_gqa=True)

    def forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None, cache=None,
                **kwargs):
        q, k, v = project_qkv(self, hidden_states, position_embeddings, self.qk_norm)
        y = self.attend(q, k, v, attention_mask, cache)
        y = y.transpose(1, 2).reshape(*hidden_states.shape[:-1], -1)  # (B, S, Hq*D)
        return self.o_proj(y), None
