"""Quadratic references for the fast attention paths (tests compare against these; never used in runs)."""
import torch


def linear_sliding_window_reference(q, k, v, fq, fk, gate, window: int, scale: float, sinks: int = 0):
    """Same contract as `linear_kernels.chunked_prefill`, built from full S x S matrices."""
    hq, hkv, s = q.shape[1], k.shape[1], q.shape[2]
    rep = hq // hkv
    k, v, fk = (x.repeat_interleave(rep, dim=1) for x in (k, v, fk))
    i = torch.arange(s).view(s, 1)
    j = torch.arange(s).view(1, s)
    softmax_set = ((j <= i) & (j > i - window)) | ((j < sinks) & (j <= i))
    linear_set = (j <= i - window) & (j >= sinks)
    scores = (q @ k.transpose(-1, -2) * scale).masked_fill(~softmax_set, float("-inf"))
    e = torch.exp(scores - scores.amax(dim=-1, keepdim=True))
    a = (fq @ fk.transpose(-1, -2)) * linear_set
    g = gate.view(1, hq, 1, 1)
    weights = g * e + (1 - g) * a
    return (weights @ v) / weights.sum(dim=-1, keepdim=True)


def softmax_reference(q, k, v, scale: float, sliding_window: int | None = None):
    """Causal softmax attention from the full S x S matrix, GQA by repetition; with `sliding_window` a query
    sees its last `sliding_window` keys only (itself included), as transformers' sliding masks do."""
    s = q.shape[2]
    rep = q.shape[1] // k.shape[1]
    k, v = (x.repeat_interleave(rep, dim=1) for x in (k, v))
    i = torch.arange(s).view(s, 1)
    j = torch.arange(s).view(1, s)
    allowed = (j <= i) & ((j > i - sliding_window) if sliding_window else True)
    scores = (q @ k.transpose(-1, -2) * scale).masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def mixed_heads_reference(q, k, v, fq, fk, gate, kept_heads, window: int, scale: float, sinks: int = 0,
                          sliding_window: int | None = None):
    """Same contract as `MixedHeadAttention.attend` without a cache: the KV heads in `kept_heads` (and their
    query groups) get `softmax_reference`, the others `linear_sliding_window_reference` with their rows of fq,
    fk and gate (given for all heads), each head written back at its own place."""
    hq, hkv = q.shape[1], k.shape[1]
    group = hq // hkv
    out = torch.empty_like(q)
    for kv_head in range(hkv):
        rows = slice(kv_head * group, (kv_head + 1) * group)
        one = slice(kv_head, kv_head + 1)
        if kv_head in kept_heads:
            out[:, rows] = softmax_reference(q[:, rows], k[:, one], v[:, one], scale, sliding_window)
        else:
            out[:, rows] = linear_sliding_window_reference(q[:, rows], k[:, one], v[:, one], fq[:, rows], fk[:, one],
                                                           gate[rows], window, scale, sinks)
    return out
