"""Proxy quality metrics of a patched model against the original, on held-out text.

The original model's next-token distributions are computed once and kept (probabilities, their negative
entropy, argmax and NLL per token). Evaluating a plan is then one forward pass plus a few passes over the
logits: log-sum-exp, one dot product with the cached probabilities, one argmax. No student log-softmax is
materialised: KL(p || q) = sum p log p - (sum p z - logsumexp z) for student logits z.
Each metric declares its direction, so objectives and reports derive from the declaration.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .registry import Registry


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
    neg_entropy: torch.Tensor  # (B, S-1): sum p log p
    argmax: torch.Tensor  # (B, S-1)
    nll: torch.Tensor  # (B, S-1)


def _rowwise_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum over the last axis of a * b, as one batched matmul (no (B, S, V) temporary)."""
    flat_a, flat_b = a.reshape(-1, 1, a.shape[-1]), b.reshape(-1, b.shape[-1], 1)
    return torch.bmm(flat_a, flat_b).view(a.shape[:-1])


def token_stats(logits: torch.Tensor, targets: torch.Tensor, reference: _Reference) -> TokenStats:
    """Per-token stats of student `logits` (B, S-1, V) against the cached original distribution."""
    logits = logits.float()
    lse = torch.logsumexp(logits, dim=-1)
    target_logit = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    kl = reference.neg_entropy - (_rowwise_dot(reference.probs, logits) - lse)
    agree = (logits.argmax(dim=-1) == reference.argmax).float()
    return TokenStats(kl=kl, nll=lse - target_logit, nll_original=reference.nll, agree=agree)


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
            log_probs = torch.log_softmax(logits.float(), dim=-1)
            probs = log_probs.exp()
            self.reference.append(_Reference(
                probs=probs, neg_entropy=_rowwise_dot(probs, log_probs), argmax=logits.argmax(dim=-1),
                nll=-log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)))

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
