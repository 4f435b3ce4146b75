"""Needle rows (planted facts queried at the end) and the retrieval metrics computed from them."""
from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch

from layerboost_core.errors import UserError
from layerboost_core.metrics import PROXY_METRICS, ProxyEvaluator, needle_stats
from layerboost_core.needles import NOUNS, make_needles
from layerboost_core.patch import PlanSwitcher
from layerboost_core.plan import LayerPlan

EOS = 2  # the tiny models' eos_token_id


class WordTokenizer:
    """Reversible word-level tokenizer: words and single digits (with their leading space), punctuation and
    newlines; ids assigned on first sight from 3 up, so they stay inside the tiny models' vocabulary."""

    eos_token_id = EOS
    _pattern = re.compile(r" ?[A-Za-z]+| ?\d|\n| ?[^\w\s]| ")

    def __init__(self):
        self.ids: dict[str, int] = {}
        self.pieces: dict[int, str] = {EOS: "<eos>"}

    def __call__(self, text, add_special_tokens=True):
        ids = []
        for piece in self._pattern.findall(text):
            if piece not in self.ids:
                self.ids[piece] = len(self.ids) + 3
                self.pieces[self.ids[piece]] = piece
            ids.append(self.ids[piece])
        return SimpleNamespace(input_ids=ids)

    def decode(self, ids):
        return "".join(self.pieces[int(i)] for i in ids)


def filler_documents(n: int = 60) -> list[str]:
    return [" ".join(f"Sentence {j} of document {i} talks about nothing in particular." for j in range(8))
            for i in range(n)]


CONTEXT, N = 300, 8


@pytest.fixture
def needles():
    tokenizer = WordTokenizer()
    return tokenizer, make_needles(tokenizer, filler_documents(), context=CONTEXT, n_examples=N, seed=3)


def test_rows_are_deterministic_for_a_seed(needles):
    tokenizer, first = needles
    again = make_needles(tokenizer, filler_documents(), context=CONTEXT, n_examples=N, seed=3)
    assert torch.equal(first.input_ids, again.input_ids) and first.hash == again.hash
    assert first.answers == again.answers and first.keys == again.keys
    other = make_needles(tokenizer, filler_documents(), context=CONTEXT, n_examples=N, seed=4)
    assert other.hash != first.hash and other.answers != first.answers


def test_planted_fact_and_answer_decode_back(needles):
    tokenizer, rows = needles
    assert rows.input_ids.shape == (N, CONTEXT)
    for i in range(N):
        row = rows.input_ids[i].tolist()
        key, code = rows.keys[i], rows.answers[i]
        assert key in NOUNS and re.fullmatch(r"\d{5}", code)
        start, length = int(rows.needle_start[i]), int(rows.needle_len[i])
        assert tokenizer.decode(row[start:start + length]) == f" The secret code of the {key} is {code}."
        assert tokenizer.decode(row[start - 1:start]).endswith((".", "<eos>")) or start == 0  # a sentence start
        answer = int(rows.answer_len[i])
        assert answer == 5  # one token per digit with this tokenizer
        assert tokenizer.decode(row[-answer:]) == f" {code}"
        assert tokenizer.decode(row[:-answer]).endswith(f"What is the secret code of the {key}? "
                                                        f"The secret code of the {key} is")
        assert tokenizer.decode(row).count(f"secret code of the {key} is {code}") == 2  # the fact, and the answer


def test_depths_are_spread_over_the_context(needles):
    tokenizer, rows = needles
    for i in range(N):
        key = rows.keys[i]
        query = tokenizer(f"\n\nWhat is the secret code of the {key}? The secret code of the {key} is").input_ids
        filler = CONTEXT - int(rows.needle_len[i]) - len(query) - int(rows.answer_len[i])
        depth = int(rows.needle_start[i]) / filler
        # Stratified draws, then to the nearest sentence start (sentences here are ~11 tokens).
        assert i / N - 0.05 <= depth < (i + 1) / N + 0.05, (i, depth)


def test_bad_settings_are_refused():
    tokenizer = WordTokenizer()
    with pytest.raises(UserError, match=r"^needles\.n_examples: 0; allowed: >= 1$"):
        make_needles(tokenizer, filler_documents(), context=CONTEXT, n_examples=0)
    with pytest.raises(UserError, match=r"^needles\.context: 20 tokens leaves no room for filler; allowed: >= \d+$"):
        make_needles(tokenizer, filler_documents(), context=20)
    with pytest.raises(UserError, match=r"^needles: the held-out text has \d+ tokens, fewer than one context's filler"):
        make_needles(tokenizer, filler_documents(1), context=2000)


def test_needle_stats_by_hand():
    targets = torch.tensor([[0, 1, 2], [4, 3, 4]])  # row 0's answer: its last 2 tokens; row 1's: all 3
    answer_len = torch.tensor([2, 3])
    logits = torch.zeros(2, 3, 5)
    logits[0, 1, 1] = logits[0, 2, 2] = 10.0  # row 0: right at both answer positions (position 0 is question)
    logits[1, 0, 0] = 10.0  # row 1: wrong at its first answer token...
    logits[1, 1, 3] = logits[1, 2, 4] = 10.0  # ...right at the others
    stats = needle_stats(logits, targets, answer_len)
    assert stats.hit.tolist() == [1.0, 0.0]
    confident = torch.log1p(4 * torch.exp(torch.tensor(-10.0))).item()  # -log q(target) with target at 10
    wrong = 10.0 + confident  # -log q(target) with another token at 10
    assert stats.nll[0].item() == pytest.approx(confident, abs=1e-6)  # fp32: lse - z rounds at ~1e-6
    assert stats.nll[1].item() == pytest.approx((wrong + 2 * confident) / 3, rel=1e-5)


def test_retrieval_metrics_on_a_tiny_model(tiny_model, needles):
    _, rows = needles
    model = tiny_model("llama")
    blocks = torch.randint(3, 1000, (2, 17), generator=torch.Generator().manual_seed(0))
    evaluator = ProxyEvaluator(model, blocks, batch_size=3, needles=rows)
    original = evaluator.evaluate()
    assert list(original) == PROXY_METRICS.names()
    assert {PROXY_METRICS.get(m).direction for m in ("retrieval_nll", "retrieval_acc")} == {"minimize", "maximize"}
    assert original["kl"] == 0.0 and 0.0 <= original["retrieval_acc"] <= 1.0 and original["retrieval_nll"] > 0.0
    assert evaluator.evaluate() == original  # the unpatched model scores the same as itself
    assert evaluator.evaluate(["retrieval_acc", "kl"]) == {"retrieval_acc": original["retrieval_acc"], "kl": 0.0}
    switcher = PlanSwitcher(model, {"linear": {"window": 4, "feature_dim": 8, "sinks": 2}})
    switcher.apply(LayerPlan.from_string("NLNL"))
    patched = evaluator.evaluate(["retrieval_nll"])
    assert patched["retrieval_nll"] != original["retrieval_nll"]
    switcher.restore()
    assert evaluator.evaluate(["retrieval_nll"]) == {"retrieval_nll": original["retrieval_nll"]}


def test_retrieval_metrics_match_a_plain_forward(tiny_model, needles):
    """The answer-only logits (logits_to_keep) give the same numbers as slicing a full forward."""
    _, rows = needles
    model = tiny_model("qwen3")
    got = ProxyEvaluator(model, torch.zeros(0, 4, dtype=torch.long), needles=rows).evaluate(
        ["retrieval_nll", "retrieval_acc"])
    with torch.no_grad():
        logits = model(input_ids=rows.input_ids[:, :-1]).logits[:, -5:]
    stats = needle_stats(logits, rows.input_ids[:, -5:], rows.answer_len)
    assert got["retrieval_nll"] == pytest.approx(stats.nll.mean().item(), rel=1e-5)
    assert got["retrieval_acc"] == stats.hit.mean().item()
