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
