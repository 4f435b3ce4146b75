"""Post-RoPE q/k/v out of a family attention module, as every supported family computes them."""
from __future__ import annotations

import torch
from torch import nn


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding as every supported family applies it; x: (B, H, S, D), cos/sin: (B, S, D)."""
    return x * cos.unsqueeze(1) + rotate_half(x) * sin.unsqueeze(1)


def project_qkv(attn: nn.Module, hidden: torch.Tensor, position_embeddings, qk_norm: bool):
    """hidden (B, S, hidden) -> q (B, Hq, S, D), k and v (B, Hkv, S, D), RoPE applied to q and k.

    `attn` has the family's `q_proj`, `k_proj`, `v_proj`, `head_dim` and, with `qk_norm` (Qwen3, Gemma 3:
    q and k normalised per head before RoPE), `q_norm` and `k_norm`. `position_embeddings`: the (cos, sin)
    the decoder layer hands its attention (per layer type in Gemma 3)."""
    batch, seq = hidden.shape[:2]
    head_dim = attn.head_dim
    q = attn.q_proj(hidden).view(batch, seq, -1, head_dim)
    k = attn.k_proj(hidden).view(batch, seq, -1, head_dim)
    v = attn.v_proj(hidden).view(batch, seq, -1, head_dim).transpose(1, 2)
    if qk_norm:
        q, k = attn.q_norm(q), attn.k_norm(k)
    cos, sin = position_embeddings
    return apply_rope(q.transpose(1, 2), cos, sin), apply_rope(k.transpose(1, 2), cos, sin), v
