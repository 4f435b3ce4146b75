"""Proxy quality metrics of a patched model against the original, on held-out text.

The original model's next-token log-probabilities are computed once and kept; evaluating a plan is one
pass over the held-out blocks that returns every registered metric at once. Each metric declares its
direction, so objectives and reports derive from the declaration.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .registry import Registry


@dataclass(frozen=True)
class ProxyMetric:
    """A per-token quantity averaged over held-out tokens. `direction` is 'minimize' or 'maximize'."""

    name: str
    direction: str
    per_token: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (student lp, teacher lp, targets)
    description: str = ""


PROXY_METRICS: Registry[ProxyMetric] = Registry("proxy metric")


def _register(metric: ProxyMetric) -> ProxyMetric:
    return PROXY_METRICS.register(metric.name)(metric)


def _kl(student, teacher, targets):
    return (teacher.exp() * (teacher - student)).sum(-1)


def _nll(student, teacher, targets):
    return -student.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def _nll_delta(student, teacher, targets):
    return _nll(student, teacher, targets) - _nll(teacher, teacher, targets)


def _top1(student, teacher, targets):
    return (student.argmax(-1) == teacher.argmax(-1)).to(student.dtype)


_register(ProxyMetric("kl", "minimize", _kl, "KL(original || plan) of next-token distributions, nats/token"))
_register(ProxyMetric("nll", "minimize", _nll, "negative log-likelihood of the held-out text, nats/token"))
_register(ProxyMetric("nll_delta", "minimize", _nll_delta, "NLL increase over the original model, nats/token"))
_register(ProxyMetric("top1_agreement", "maximize", _top1, "fraction of tokens whose argmax matches the original"))


class ProxyEvaluator:
    """Scores the model's current plan against the original on fixed held-out blocks.

    Build it while the model is unpatched (all-softmax): the constructor caches the original log-probs.
    """

    def __init__(self, model, blocks: torch.Tensor, batch_size: int = 4, cache_dtype=torch.float32):
        self.model = model
        self.blocks = blocks
        self.batch_size = batch_size
        self.device = model.get_input_embeddings().weight.device
        self.teacher: list[torch.Tensor] = [lp.to(cache_dtype) for lp in self._log_probs()]

    def _log_probs(self):
        """Per batch, next-token log-probs (B, S-1, V) of the model as it is now."""
        for start in range(0, self.blocks.shape[0], self.batch_size):
            ids = self.blocks[start:start + self.batch_size].to(self.device)
            with torch.inference_mode():
                hidden = self.model.model(input_ids=ids, use_cache=False).last_hidden_state[:, :-1]
                yield torch.log_softmax(self.model.lm_head(hidden).float(), dim=-1)

    def evaluate(self, metrics=None) -> dict[str, float]:
        """Every metric (or those named) of the current plan, averaged over held-out tokens."""
        names = list(metrics or PROXY_METRICS.names())
        chosen = [PROXY_METRICS.get(n) for n in names]
        totals = {n: 0.0 for n in names}
        count = 0
        for index, student in enumerate(self._log_probs()):
            teacher = self.teacher[index].to(student.dtype)
            start = index * self.batch_size
            targets = self.blocks[start:start + student.shape[0], 1:].to(self.device)
            for metric in chosen:
                totals[metric.name] += metric.per_token(student, teacher, targets).sum().item()
            count += targets.numel()
        return {n: totals[n] / count for n in names}
