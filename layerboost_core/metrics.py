"""Proxy quality metrics of a patched model against the original, on held-out text.

The original model's next-token distributions are computed once and kept (probabilities, sum p log p, argmax
and NLL per token). Evaluating a plan is then one forward pass plus a few elementwise passes over the logits.
KL(p || q) = sum p log p - sum p log q, with the first sum cached and both sums taken elementwise by the
same function (sum p z - logsumexp(z) * sum p), so identical logits give exactly 0; against a materialised
log-softmax it differs by at most ~1e-5 nats/token. (A batched matmul for sum p z, instead of the
elementwise product, is only good to ~5e-3 over a 49k vocabulary on CPU: that version read 0.0012
nats/token for the unpatched model itself.)
Each metric declares its direction, so objectives and reports derive from the declaration.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .registry import Registry

# Part of every cache key and study name built on metric values: bump it when a metric's numbers change.
METRICS_VERSION = 2  # 2: exact KL sum (v1 had a ~1e-3 nats/token floor, see the module docstring)


@dataclass
class TokenStats:
    """Per-token quantities (all shaped like the targets) that every metric is computed from."""

    kl: torch.Tensor  # KL(original || plan), nats
    nll: torch.Tensor  # -log q(target)
    nll_original: torch.Tensor  # -log p(target)
    agree: torch.Tensor  # 1.0 where argmax q == argmax p


@dataclass(frozen=True)
class ProxyMetric:
    """A per-token quantity averaged over held-out tokens. `direction` is 'minimize' or 'maximize'."""

    name: str
    direction: str
    per_token: Callable[[TokenStats], torch.Tensor]
    description: str = ""


PROXY_METRICS: Registry[ProxyMetric] = Registry("proxy metric")


def _register(metric: ProxyMetric) -> ProxyMetric:
    return PROXY_METRICS.register(metric.name)(metric)


_register(ProxyMetric("kl", "minimize", lambda s: s.kl, "KL(original || plan) of next-token distributions, nats/token"))
_register(ProxyMetric("nll", "minimize", lambda s: s.nll, "negative log-likelihood of held-out text, nats/token"))
_register(ProxyMetric("nll_delta", "minimize", lambda s: s.nll - s.nll_original, "NLL increase over the original"))
_register(ProxyMetric("top1_agreement", "maximize", lambda s: s.agree, "fraction of tokens whose argmax matches the original"))


@dataclass
class _Reference:
    """The original model's distribution on one batch of held-out blocks."""

    probs: torch.Tensor  # (B, S-1, V)
    prob_sum: torch.Tensor  # (B, S-1): sum p as rounded (1 to ~1e-6), kept so the KL algebra is exact
    neg_entropy: torch.Tensor  # (B, S-1): sum p log p
    argmax: torch.Tensor  # (B, S-1)
    nll: torch.Tensor  # (B, S-1)


# Positions per elementwise pass: small enough that a chunk's (B, positions, V) temporaries stay in cache.
# The passes are memory-bound: on SmolLM2's 49k vocabulary, 8 positions at a time with logsumexp instead of
# log_softmax took the per-plan work from 0.30 s (128 positions) to 0.15 s per 2 x 511 tokens.
POSITIONS_PER_PASS = 8


def _chunks(logits: torch.Tensor):
    """(positions slice, fp32 logits of those positions, their logsumexp), a bounded chunk at a time."""
    for start in range(0, logits.shape[1], POSITIONS_PER_PASS):
        part = slice(start, start + POSITIONS_PER_PASS)
        z = logits[:, part].float()
        yield part, z, torch.logsumexp(z, dim=-1)


def _cross(probs: torch.Tensor, prob_sum: torch.Tensor, z: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """sum_v p_v log q_v with log q = z - lse, without materialising log q: sum p z - lse * sum p. The same
    function gives the reference's sum p log p, so identical logits give a KL of exactly 0."""
    return (probs * z).sum(-1) - lse * prob_sum


def _target_nll(z: torch.Tensor, lse: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return lse - z.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def reference_of(logits: torch.Tensor, targets: torch.Tensor) -> _Reference:
    """The cached view of the original model's `logits` (B, S-1, V) on one batch."""
    probs = torch.empty(logits.shape, device=logits.device)
    prob_sum, neg_entropy, nll, argmax = [], [], [], []
    for part, z, lse in _chunks(logits):
        probs[:, part] = torch.exp(z - lse.unsqueeze(-1))
        prob_sum.append(probs[:, part].sum(-1))
        neg_entropy.append(_cross(probs[:, part], prob_sum[-1], z, lse))
        nll.append(_target_nll(z, lse, targets[:, part]))
        argmax.append(z.argmax(dim=-1))
    return _Reference(probs=probs, prob_sum=torch.cat(prob_sum, 1), neg_entropy=torch.cat(neg_entropy, 1),
                      argmax=torch.cat(argmax, 1), nll=torch.cat(nll, 1))


def token_stats(logits: torch.Tensor, targets: torch.Tensor, reference: _Reference) -> TokenStats:
    """Per-token stats of student `logits` (B, S-1, V) against the cached original distribution."""
    kl, nll, argmax = [], [], []
    for part, z, lse in _chunks(logits):
        kl.append(reference.neg_entropy[:, part] - _cross(reference.probs[:, part], reference.prob_sum[:, part], z, lse))
        nll.append(_target_nll(z, lse, targets[:, part]))
        argmax.append(z.argmax(dim=-1))  # while the chunk is still in cache
    agree = (torch.cat(argmax, 1) == reference.argmax).float()
    return TokenStats(kl=torch.cat(kl, 1), nll=torch.cat(nll, 1), nll_original=reference.nll, agree=agree)


class ProxyEvaluator:
    """Scores the model's current plan against the original on fixed held-out blocks.

    Build it while the model is unpatched (all-softmax): the constructor caches the original distributions.
    """

    def __init__(self, model, blocks: torch.Tensor, batch_size: int = 4):
        self.model = model
        self.blocks = blocks
        self.batch_size = batch_size
        self.device = model.get_input_embeddings().weight.device
        self.reference: list[_Reference] = []
        for targets, logits in self._logits():
            self.reference.append(reference_of(logits, targets))

    def _logits(self):
        """Per batch, (targets (B, S-1), next-token logits (B, S-1, V)) of the model as it is now."""
        for start in range(0, self.blocks.shape[0], self.batch_size):
            ids = self.blocks[start:start + self.batch_size].to(self.device)
            with torch.inference_mode():
                yield ids[:, 1:], self.model(input_ids=ids[:, :-1], use_cache=False).logits

    def evaluate(self, metrics=None) -> dict[str, float]:
        """Every metric (or those named) of the current plan, averaged over held-out tokens."""
        chosen = [PROXY_METRICS.get(n) for n in (metrics or PROXY_METRICS.names())]
        totals = {m.name: 0.0 for m in chosen}
        count = 0
        for reference, (targets, logits) in zip(self.reference, self._logits()):
            with torch.inference_mode():
                stats = token_stats(logits, targets, reference)
                for metric in chosen:
                    totals[metric.name] += metric.per_token(stats).sum().item()
            count += targets.numel()
        return {name: total / count for name, total in totals.items()}
