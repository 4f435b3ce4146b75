"""The `linear` option's module: sliding-window softmax over the last W tokens (plus a few sink tokens) and
linear attention over the rest.

Reuses the layer's own q/k/v/o projections (and q/k norms), RoPE and GQA; adds only a Hedgehog feature map for
q and k and a per-head gate. Those learned parts live in `LearnedLinearParts` and are what the bank stores.
The math is `linear_kernels.py`; with a cache, the layer keeps its `LinearState` in `cache.linear_states`.
`attend_linear` is the option's attention on any subset of heads with those heads' learned parts: the mixed
options (`mixed_attention.py`) run it on the heads they do not keep softmax.
"""
from __future__ import annotations

import torch
from torch import nn

from .linear_kernels import LinearState, chunked_prefill, decode_step, empty_state
from .qkv import project_qkv


class HedgehogFeatureMap(nn.Module):
    """phi(x) = [softmax(x W_h + b_h), softmax(-(x W_h + b_h))] per head: positive, 2F features."""

    def __init__(self, heads: int, head_dim: int, feature_dim: int):
        super().__init__()
        weight = torch.empty(heads, head_dim, feature_dim)
        for h in range(heads):  # identity where shapes allow: phi starts as a softmax over q's own dims
            nn.init.eye_(weight[h]) if feature_dim == head_dim else nn.init.orthogonal_(weight[h])
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(torch.zeros(heads, 1, feature_dim))

    def forward(self, x: torch.Tensor, heads: torch.Tensor | None = None) -> torch.Tensor:
        """phi(x) for x (B, H, S, D): all heads, or with `heads` (H indices) the map's rows of those heads."""
        weight, bias = (self.weight, self.bias) if heads is None else (self.weight[heads], self.bias[heads])
        z = torch.matmul(x, weight) + bias  # (B, H, S, D) @ (H, D, F) -> (B, H, S, F)
        both = torch.stack([z, -z], dim=-2)  # (B, H, S, 2, F): one softmax call for both signs
        return torch.softmax(both, dim=-1).flatten(-2)  # (B, H, S, 2F)


class LearnedLinearParts(nn.Module):
    """Everything attention transfer trains for one layer."""

    def __init__(self, q_heads: int, kv_heads: int, head_dim: int, feature_dim: int):
        super().__init__()
        self.feature_q = HedgehogFeatureMap(q_heads, head_dim, feature_dim)
        self.feature_k = HedgehogFeatureMap(kv_heads, head_dim, feature_dim)
        self.gate_logit = nn.Parameter(torch.zeros(q_heads))  # sigmoid(0) = 0.5: window and linear equal
        self._stacked = None  # (key, weight, bias) of `_stacked_maps`; a cache, not part of the state dict

    def gate(self, heads: torch.Tensor | None = None) -> torch.Tensor:
        """Per query head, the weight of the softmax part (of the query heads `heads` only, when given)."""
        return torch.sigmoid(self.gate_logit if heads is None else self.gate_logit[heads])

    def one_token_features(self, q: torch.Tensor, k: torch.Tensor, q_heads: torch.Tensor | None = None,
                           kv_heads: torch.Tensor | None = None):
        """(feature_q(q), feature_k(k)) for a single position, q (B, Hq, 1, D) and k (B, Hkv, 1, D): both maps
        and both signs in one bmm batched over heads (B rows each) and one softmax. The results are views of
        one (Hq + Hkv, B, 2F) tensor. With `q_heads` and `kv_heads`, q and k hold only those heads."""
        weight, bias = self._stacked_maps()
        if q_heads is not None:
            rows = torch.cat([q_heads, kv_heads + self.gate_logit.shape[0]])  # k maps follow all Hq q maps
            weight, bias = weight[rows], bias[rows]
        b, hq, _, d = q.shape
        h = weight.shape[0]
        x = torch.cat([q.reshape(b, hq, d), k.reshape(b, h - hq, d)], dim=1).transpose(0, 1)  # (H, B, D)
        z = torch.baddbmm(bias, x, weight).view(h, b, 2, -1)  # [x W + b, -(x W + b)] per head
        phi = torch.softmax(z, dim=-1).view(h, b, 1, -1).transpose(0, 1)  # (B, H, 1, 2F)
        return phi[:, :hq], phi[:, hq:]

    def _stacked_maps(self):
        """[W, -W] and [b, -b] of the q feature map then of the k one: (Hq + Hkv, D, 2F) and (Hq + Hkv, 1, 2F).
        Cached while nothing is differentiated, keyed on the parameters' storage and version counter (an
        in-place update, load_state_dict, a move or a new Parameter all rebuild it)."""
        # Plain dict lookups: nn.Module.__getattr__ would cost more than the whole cache check.
        maps = self._modules
        q_params, k_params = maps["feature_q"]._parameters, maps["feature_k"]._parameters
        params = (q_params["weight"], q_params["bias"], k_params["weight"], k_params["bias"])
        key = None
        if not (torch.is_grad_enabled() and any(p.requires_grad for p in params)) and not params[0].is_inference():
            key = (params[0].dtype, *(p.data_ptr() for p in params), *(p._version for p in params))
            cached = self._stacked
            if cached is not None and cached[0] == key:
                return cached[1], cached[2]

        def build():
            wq, bq, wk, bk = params
            return (torch.cat([torch.cat([wq, -wq], dim=-1), torch.cat([wk, -wk], dim=-1)], dim=0),
                    torch.cat([torch.cat([bq, -bq], dim=-1), torch.cat([bk, -bk], dim=-1)], dim=0))

        if key is None:
            return build()
        with torch.inference_mode(False), torch.no_grad():  # normal tensors: usable in and out of inference mode
            weight, bias = build()
        self._stacked = (key, weight, bias)
        return weight, bias


class LinearSlidingWindowAttention(nn.Module):
    """Drop-in replacement for a family's attention module (same call signature, returns (out, None)).

    `qk_norm`: the family normalises q and k per head before RoPE (the module then reuses `attn`'s norms)."""

    def __init__(self, attn: nn.Module, window: int, feature_dim: int, sinks: int = 0, qk_norm: bool = False):
        super().__init__()
        self.layer_idx = attn.layer_idx
        self.head_dim = attn.head_dim
        self.scaling = attn.scaling
        self.window = window
        self.sinks = sinks
        self.qk_norm = qk_norm
        # Shared with the original module (same Parameter objects), so switching options costs nothing.
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
        if qk_norm:
            self.q_norm, self.k_norm = attn.q_norm, attn.k_norm
        q_heads = attn.q_proj.out_features // attn.head_dim
        kv_heads = attn.k_proj.out_features // attn.head_dim
        self.learned = LearnedLinearParts(q_heads, kv_heads, attn.head_dim, feature_dim)
        self.learned.to(device=attn.q_proj.weight.device, dtype=attn.q_proj.weight.dtype)

    @classmethod
    def from_settings(cls, attn: nn.Module, settings: dict, qk_norm: bool) -> "LinearSlidingWindowAttention":
        """The module for the option settings `{"window", "feature_dim", "sinks" (default 0)}` (a plan's
        `settings["linear"]`, as plan JSON and an exported config store them)."""
        return cls(attn, int(settings["window"]), int(settings["feature_dim"]), int(settings.get("sinks", 0)),
                   qk_norm)

    def project_qkv(self, hidden: torch.Tensor, position_embeddings):
        """hidden (B, S, hidden) -> post-RoPE q (B, Hq, S, D), k and v (B, Hkv, S, D) (see `qkv.project_qkv`)."""
        return project_qkv(self, hidden, position_embeddings, self.qk_norm)

    def attend(self, q, k, v, state: LinearState | None = None, return_state: bool = False):
        """Core attention on post-RoPE q/k/v (B, H, S, D) -> (B, Hq, S, D) (see `attend_linear`)."""
        return attend_linear(self.learned, q, k, v, self.window, self.scaling, self.sinks, state, return_state)

    def empty_state(self, batch: int, like: torch.Tensor) -> LinearState:
        kv_heads = self.k_proj.out_features // self.head_dim
        return empty_state(batch, kv_heads, self.head_dim, 2 * self.learned.feature_q.weight.shape[-1], like)

    def forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None, cache=None,
                **kwargs):
        q, k, v = self.project_qkv(hidden_states, position_embeddings)
        layer_states = getattr(cache, "linear_states", None)  # set by the hybrid cache (hybrid_cache.py)
        if layer_states is None:
            y = self.attend(q, k, v)
        else:
            y, layer_states[self.layer_idx] = self.attend(q, k, v, layer_states.get(self.layer_idx),
                                                          return_state=True)
        y = y.transpose(1, 2).reshape(*hidden_states.shape[:-1], -1)  # (B, S, Hq*D)
        return self.o_proj(y), None


def attend_linear(learned: LearnedLinearParts, q, k, v, window: int, scale: float, sinks: int,
                  state: LinearState | None = None, return_state: bool = False, heads=None):
    """The `linear` option's attention on post-RoPE q (B, Hq, S, D), k and v (B, Hkv, S, D) -> (B, Hq, S, D).

    With a state, continues from it (and may update that state's buffers in place: use the returned state,
    never the one passed in). `heads`: (query head indices, KV head indices) of `learned`'s heads that q, k
    and v hold (a `mixed` layer's linear heads, each KV head with its whole query group); None: all of them."""
    q_heads, kv_heads = (None, None) if heads is None else heads
    gate = learned.gate(q_heads)
    if state is not None and q.shape[2] == 1:  # one decode step: the lean path
        fq, fk = learned.one_token_features(q, k, q_heads, kv_heads)
        y, state = decode_step(q, k, v, fq, fk, gate, window, scale, state, sinks)
        return (y, state) if return_state else y
    fq, fk = learned.feature_q(q, q_heads), learned.feature_k(k, kv_heads)
    if state is None:
        return chunked_prefill(q, k, v, fq, fk, gate, window, scale, sinks, return_state)
    outputs = []
    for t in range(q.shape[2]):  # continuation token by token (decode is one token at a time)
        sl = slice(t, t + 1)
        y, state = decode_step(q[:, :, sl], k[:, :, sl], v[:, :, sl], fq[:, :, sl], fk[:, :, sl], gate, window,
                               scale, state, sinks)
        outputs.append(y)
    y = torch.cat(outputs, dim=2)
    return (y, state) if return_state else y
