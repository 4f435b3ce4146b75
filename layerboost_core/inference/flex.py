"""The `linear` option's prefill with its softmax part in `flex_attention` (the CUDA fast path).

Same contract and formula as `linear_kernels.chunked_prefill` (see its module docstring):

    y_i = (g * sum_sm e_ij v_j + (1 - g) * sum_lin a_ij v_j) / (g * sum_sm e_ij + (1 - g) * sum_lin a_ij)

with e_ij = exp(s_ij - m_i), m_i the row max over the softmax set (window + sinks). flex_attention gives the
normalised softmax part and its log-sum-exp, so sum_sm e_ij = exp(lse_i - m_i), without the chunked path's
(G*W x (2W + sinks)) score tensors. The linear part is the chunked one (`linear_kernels._linear_sums`).

m_i comes from flex_attention's `max_scores`, which torch (2.13) returns on CUDA only; on CPU, where this path
runs only to be tested against the reference (eagerly, slowly), it is computed from the dense masked scores.
"""
from __future__ import annotations

import functools
import math

import torch
from torch.nn.attention.flex_attention import AuxRequest, create_block_mask, flex_attention

from .linear_kernels import _group_rows, _linear_sums, _linear_views, _masks, _pad_to, _state_after, \
    _ungroup_rows, _without_sinks


@functools.lru_cache(maxsize=16)
def _block_mask(s: int, window: int, sinks: int, device: str):
    """The softmax set as a flex block mask: causal keys in the window (i - W, i] or among the first sinks."""

    def softmax_set(b, h, i, j):
        return (j <= i) & ((j > i - window) | (j < sinks))

    return create_block_mask(softmax_set, None, None, s, s, device=device)


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    """flex_attention compiled: eager flex is a dense reference implementation, only compiled it is fused.
    Default (automatic) dynamic shapes: a second prefill length recompiles once for any length, not per length."""
    return torch.compile(flex_attention)


def _dense_row_max(q, k, scale: float, window: int, sinks: int) -> torch.Tensor:
    """m_i from the full (S x S) masked scores: CPU only (flex returns no max there), for tests."""
    s = q.shape[2]
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    i = torch.arange(s, device=q.device).view(s, 1)
    j = torch.arange(s, device=q.device).view(1, s)
    allowed = (j <= i) & ((j > i - window) | (j < sinks))
    return (q @ k.transpose(-1, -2) * scale).masked_fill(~allowed, float("-inf")).amax(-1).float()


def _softmax_part(q, k, v, window: int, scale: float, sinks: int):
    """(normalised softmax part (B, Hq, S, D), lse (B, Hq, S), row max (B, Hq, S)), fp32 statistics."""
    mask = _block_mask(q.shape[2], window, sinks, str(q.device))
    if q.is_cuda:
        out, aux = _compiled_flex()(q, k, v, block_mask=mask, scale=scale, enable_gqa=True,
                                    return_aux=AuxRequest(lse=True, max_scores=True))
        return out, aux.lse, aux.max_scores
    out, aux = flex_attention(q, k, v, block_mask=mask, scale=scale, enable_gqa=True,
                              return_aux=AuxRequest(lse=True))
    return out, aux.lse, _dense_row_max(q, k, scale, window, sinks)


@torch.no_grad()
def flex_prefill(q, k, v, fq, fk, gate, window: int, scale: float, sinks: int = 0, return_state: bool = False):
    """`chunked_prefill` with the softmax part in flex_attention (inference only: no autograd through the
    row max). q: (B, Hq, S, D), k/v: (B, Hkv, S, D), fq: (B, Hq, S, F), fk: (B, Hkv, S, F), gate: (Hq,)."""
    b, hq, s, d = q.shape
    hkv, c = k.shape[1], window
    n = math.ceil(s / c)
    sinks = min(sinks, s)
    _, old, older = _masks(n, c, hq // hkv, sinks, q.device, q.dtype)
    fk = _without_sinks(fk, sinks)
    fqg = _group_rows(_pad_to(fq, n * c), hkv, n, c)  # (B, Hkv, n, G*c, F)
    vx_cur, vx_prev, fk_cur, fk_prev = _linear_views(v, fk, n, c)
    lin = _ungroup_rows(_linear_sums(fqg, fk_cur, fk_prev, vx_cur, vx_prev, old, older), hq, c, s).float()
    out, lse, row_max = _softmax_part(q, k, v, window, scale, sinks)
    g = gate.float().view(1, hq, 1, 1)
    w_sm = g * torch.exp(lse - row_max).unsqueeze(-1)  # g * sum_sm exp(s - m)
    w_lin = 1 - g
    total = w_sm + w_lin * lin[..., d:]
    y = ((out.float() * w_sm + w_lin * lin[..., :d]) / total).to(q.dtype)
    if not return_state:
        return y
    return y, _state_after(k, v, fk, window, sinks)
