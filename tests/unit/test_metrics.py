"""Proxy metrics against hand-computed values, and the unpatched model scoring exactly zero KL."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from layerboost_core.errors import UserError
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


# --- top-k reference ----------------------------------------------------------------------------------------


def kl_of(model, blocks, top_k, plan=None):
    """Proxy KL of `plan` (None: unpatched) against the unpatched model, with a top-k or exact reference."""
    evaluator = ProxyEvaluator(model, blocks, batch_size=2, reference_top_k=top_k)
    torch.manual_seed(0)  # the same untrained `linear` parts in every call, so calls compare one plan
    switcher = PlanSwitcher(model, {"linear": {"window": 4, "feature_dim": 8, "sinks": 2}})
    if plan:
        switcher.apply(LayerPlan.from_string(plan))
    try:
        return evaluator.evaluate(["kl"])["kl"]
    finally:
        switcher.restore()


@pytest.mark.parametrize("plan", ["SNSN", "LLLL"])
def test_top_k_kl_is_a_lower_bound_of_the_exact_kl_and_equal_at_full_vocabulary(tiny_model, plan):
    model = tiny_model("llama")
    blocks = torch.randint(3, 1000, (2, 17), generator=torch.Generator().manual_seed(0))
    vocab = model.config.vocab_size
    exact = kl_of(model, blocks, None, plan)
    assert exact > 0.0
    assert kl_of(model, blocks, vocab, plan) == exact  # k covering the vocabulary is the exact reference
    assert kl_of(model, blocks, 10 * vocab, plan) == exact
    # With one token fewer, the tail bucket holds one token: the bucketed KL equals the exact one up to fp32
    # rounding of sums of size ~log V (11 nats here) and of the tail mass 1 - sum (~1e-6).
    assert kl_of(model, blocks, vocab - 1, plan) == pytest.approx(exact, abs=2e-5)
    previous = 0.0
    for k in (1, 1024, 16384):
        bound = kl_of(model, blocks, k, plan)
        assert 0.0 <= bound <= exact + 1e-5
        assert bound >= previous - 1e-5  # merging fewer tokens into the tail can only tighten the bound
        previous = bound


class ZipfLogits(torch.nn.Module):
    """Next-token logits of a peaked, language-like distribution (p_i ~ 1 / rank^1.1 over a shuffled
    vocabulary), one per input token, plus `noise` (a plan's error)."""

    def __init__(self, vocab: int, noise: float, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.embed = torch.nn.Embedding(vocab, 2)
        ranks = torch.stack([torch.randperm(vocab, generator=generator) + 1 for _ in range(vocab)]).float()
        self.table = -1.1 * ranks.log() + noise * torch.randn(vocab, vocab, generator=generator)

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids, use_cache=False):
        return SimpleNamespace(logits=self.table[input_ids])


def test_top_k_kl_is_within_tolerance_on_peaked_distributions():
    """Stated tolerance: on Zipf-shaped distributions (the shape of real next-token ones) over 2,048 tokens,
    k = 128 keeps at least 90% of the exact KL (94% here). SmolLM2 figures: DEFAULT_TOP_K in metrics.py."""
    blocks = torch.randint(0, 2048, (2, 65), generator=torch.Generator().manual_seed(0))
    original, student = ZipfLogits(2048, 0.0), ZipfLogits(2048, 0.5)
    student.table += original.table
    exact, top = ProxyEvaluator(original, blocks, reference_top_k=None), ProxyEvaluator(original, blocks, reference_top_k=128)
    original.table = student.table
    want, got = exact.evaluate(["kl"])["kl"], top.evaluate(["kl"])["kl"]
    assert 0.9 * want <= got <= want * (1 + 1e-6)


def test_top_k_kl_is_exact_when_the_tail_keeps_its_shape():
    """KL with the tail as one bucket loses exactly the KL inside the tail, which is 0 when q's tail is p's
    scaled: then the bucketed value must equal the exact one (a check of the tail term's algebra)."""
    original = torch.tensor([[4.0, 2.0, 0.0, -1.0, 0.5]] * VOCAB)
    student = original + torch.tensor([1.0, -1.0, 0.7, 0.7, 0.7])  # a constant shift on tokens 2, 3, 4
    blocks = torch.tensor([[0, 1, 2, 3], [4, 0, 1, 1]])
    model = FixedLogits(original)
    exact, top2 = ProxyEvaluator(model, blocks, reference_top_k=None), ProxyEvaluator(model, blocks, reference_top_k=2)
    model.table = student
    p, q = softmax(original[0].tolist()), softmax(student[0].tolist())
    assert top2.evaluate(["kl"])["kl"] == pytest.approx(exact.evaluate(["kl"])["kl"], rel=1e-5)
    assert exact.evaluate(["kl"])["kl"] == pytest.approx(sum(pi * math.log(pi / qi) for pi, qi in zip(p, q)), rel=1e-5)
    top1 = ProxyEvaluator(FixedLogits(original), blocks, reference_top_k=1)
    top1.model.table = student
    assert top1.evaluate(["kl"])["kl"] < exact.evaluate(["kl"])["kl"] - 1e-3  # token 1 merged into the tail: loses


@pytest.mark.parametrize("top_k", [None, 1, 7])
def test_the_original_scores_zero_kl_with_any_reference(tiny_model, top_k):
    model = tiny_model("qwen3")
    blocks = torch.randint(3, 1000, (3, 17), generator=torch.Generator().manual_seed(0))
    assert ProxyEvaluator(model, blocks, batch_size=2, reference_top_k=top_k).evaluate()["kl"] == 0.0


def test_top_k_reference_memory_is_independent_of_the_vocabulary(tiny_model):
    model = tiny_model("llama")
    blocks = torch.randint(3, 1000, (3, 17), generator=torch.Generator().manual_seed(0))
    evaluator = ProxyEvaluator(model, blocks, batch_size=2, reference_top_k=8)
    for reference in evaluator.reference:
        batch, positions = reference.nll.shape
        assert reference.probs.shape == reference.index.shape == (batch, positions, 8)
        assert reference.index.dtype == torch.int32
        tensors = [v for v in vars(reference).values() if isinstance(v, torch.Tensor)]
        # probs + index (k each) and five (B, S-1) rows: rest, prob_sum, neg_entropy, argmax, nll
        assert sum(t.numel() for t in tensors) == batch * positions * (2 * 8 + 5)
    exact = ProxyEvaluator(model, blocks, batch_size=2, reference_top_k=None)
    assert exact.reference[0].probs.shape[-1] == model.config.vocab_size


def test_bad_top_k_and_missing_facts_are_refused():
    model = FixedLogits(torch.zeros(VOCAB, VOCAB))
    blocks = torch.tensor([[0, 1, 2, 3]])
    with pytest.raises(UserError, match=r"^proxy\.reference_top_k: 0; allowed: an integer >= 1, or None \(exact\)$"):
        ProxyEvaluator(model, blocks, reference_top_k=0)
    evaluator = ProxyEvaluator(model, blocks)
    assert list(evaluator.evaluate()) == ["kl", "nll", "nll_delta", "top1_agreement"]  # no facts: as before
    with pytest.raises(UserError, match=r"^proxy metric: 'retrieval_acc' needs planted facts; these blocks have none"):
        evaluator.evaluate(["kl", "retrieval_acc"])
