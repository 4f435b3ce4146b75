"""Proxy metrics against hand-computed values, and the unpatched model scoring exactly zero KL."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from layerboost_core.metrics import PROXY_METRICS, ProxyEvaluator
from layerboost_core.patch import PlanSwitcher
from layerboost_core.plan import LayerPlan

VOCAB = 5


class FixedLogits(torch.nn.Module):
    """A 'model' whose next-token logits are a fixed table indexed by the input token (so hand-computable)."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, 2)
        self.table = table

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids, use_cache=False):
        return SimpleNamespace(logits=self.table[input_ids])


def softmax(row):
    exps = [math.exp(x) for x in row]
    return [e / sum(exps) for e in exps]


def test_metrics_match_hand_computed_values():
    original = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5]] * VOCAB)
    student = torch.tensor([[0.0, 3.0, 0.0, -1.0, 0.5]] * VOCAB)
    blocks = torch.tensor([[0, 1, 2, 3], [4, 0, 1, 1]])  # targets: tokens 1.., predicted from the one before
    model = FixedLogits(original)
    evaluator = ProxyEvaluator(model, blocks, batch_size=1)
    model.table = student
    got = evaluator.evaluate()

    p, q = softmax(original[0].tolist()), softmax(student[0].tolist())
    kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    targets = [1, 2, 3, 0, 1, 1]
    nll = sum(-math.log(q[t]) for t in targets) / len(targets)
    nll_original = sum(-math.log(p[t]) for t in targets) / len(targets)
    assert got["kl"] == pytest.approx(kl, rel=1e-5)
    assert got["nll"] == pytest.approx(nll, rel=1e-5)
    assert got["nll_delta"] == pytest.approx(nll - nll_original, rel=1e-5)
    assert got["top1_agreement"] == 0.0  # argmax 0 for the original, 1 for the student, at every position
    assert {m: PROXY_METRICS.get(m).direction for m in got} == {
        "kl": "minimize", "nll": "minimize", "nll_delta": "minimize", "top1_agreement": "maximize"}


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_the_original_model_scores_zero_kl_and_full_agreement(tiny_model, model_type):
    """The KL sum must not have a floor: p * (log p - log q) with both log-softmaxes computed alike is 0."""
    model = tiny_model(model_type)
    blocks = torch.randint(3, 1000, (3, 33), generator=torch.Generator().manual_seed(0))
    evaluator = ProxyEvaluator(model, blocks, batch_size=2)
    got = evaluator.evaluate()
    assert got["kl"] == 0.0 and got["nll_delta"] == 0.0 and got["top1_agreement"] == 1.0
    switcher = PlanSwitcher(model, {"linear": {"window": 4, "feature_dim": 8, "sinks": 2}})
    switcher.apply(LayerPlan.from_string("SNSN"))
    assert evaluator.evaluate()["kl"] > 0.0
    switcher.restore()
    assert evaluator.evaluate()["kl"] == 0.0
