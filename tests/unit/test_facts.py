"""Facts planted in held-out blocks and queried at their end, and the metrics that read them from one forward."""
from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch

from layerboost_core.errors import UserError
from layerboost_core.facts import FACT, NOUNS, QUERY, PlantedBlocks, plant_facts
from layerboost_core.metrics import PROXY_METRICS, ProxyEvaluator, fact_stats, reference_of, token_stats
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


LENGTH, N_FACTS, N_BLOCKS = 600, 6, 3


def text_blocks(tokenizer, n: int = N_BLOCKS, length: int = LENGTH) -> torch.Tensor:
    """Blocks of held-out-like text: numbered sentences, each ending with a period."""
    words = " ".join(f"Sentence {j} talks about nothing in particular." for j in range(n * length // 7 + 10))
    ids = tokenizer(words).input_ids
    return torch.tensor(ids[: n * length]).view(n, length)


@pytest.fixture
def planted():
    tokenizer = WordTokenizer()
    blocks = text_blocks(tokenizer)
    return tokenizer, blocks, plant_facts(tokenizer, blocks, N_FACTS, seed=3)


def test_planting_is_deterministic_for_a_seed(planted):
    tokenizer, blocks, first = planted
    again = plant_facts(tokenizer, blocks, N_FACTS, seed=3)
    assert torch.equal(first.input_ids, again.input_ids) and first.hash == again.hash
    assert first.answers == again.answers and first.keys == again.keys
    other = plant_facts(tokenizer, blocks, N_FACTS, seed=4)
    assert other.hash != first.hash and other.answers != first.answers
    rung = plant_facts(tokenizer, blocks, N_FACTS, seed="3:confirm")  # a fidelity rung's seed: other facts
    assert rung.answers != first.answers and rung.keys != first.keys


def test_facts_are_where_the_blocks_say_and_queries_close_them(planted):
    tokenizer, blocks, p = planted
    assert p.input_ids.shape == blocks.shape and p.facts_per_block == N_FACTS and p.num_facts == N_BLOCKS * N_FACTS
    for b in range(N_BLOCKS):
        row = p.input_ids[b].tolist()
        assert len(set(p.keys[b])) == N_FACTS and len(set(p.answers[b])) == N_FACTS
        previous_end = -1
        for f in range(N_FACTS):
            key, code = p.keys[b][f], p.answers[b][f]
            assert key in NOUNS and re.fullmatch(r"\d{5}", code)
            start, length = int(p.fact_start[b, f]), int(p.fact_len[b, f])
            assert tokenizer.decode(row[start:start + length]) == FACT.format(key=key) + code + "."
            assert start == 0 or tokenizer.decode(row[start - 1:start]).endswith((".", "<eos>"))  # a sentence start
            answer, width = int(p.answer_start[b, f]), int(p.answer_len[b, f])
            assert width == 5 and tokenizer.decode(row[answer:answer + width]) == code
            source = int(p.source_start[b, f])
            assert row[source:source + width] == row[answer:answer + width]  # what a copy of the fact reads
            assert tokenizer.decode(row[:answer]).endswith(QUERY.format(key=key))
            assert answer > previous_end  # queries in row order, each after the one before
            previous_end = answer + width
        assert previous_end == len(row)  # the last answer closes the block
        # every fact comes before every query; the original text is the block's own beginning, in order
        assert max(p.fact_start[b].tolist()) < min(p.answer_start[b].tolist())
        original = [t for t, scored in zip(row[1:], p.scored[b].tolist()) if scored]
        assert original == blocks[b, 1:1 + len(original)].tolist()


def test_depths_are_stratified(planted):
    tokenizer, blocks, p = planted
    for b in range(N_BLOCKS):
        starts = sorted(p.fact_start[b].tolist())
        text = int(p.scored[b].sum()) + 1
        for k, start in enumerate(starts):
            planted_before = sum(int(p.fact_len[b, f]) for f in range(N_FACTS) if p.fact_start[b, f] < start)
            depth = (start - planted_before) / text
            # drawn in [k/n, (k+1)/n), then moved to a sentence start (sentences here are ~9 tokens)
            assert k / N_FACTS - 0.03 <= depth < (k + 1) / N_FACTS + 0.03, (b, k, depth)


def test_kl_positions_exclude_every_planted_and_query_token(planted):
    tokenizer, blocks, p = planted
    for b in range(N_BLOCKS):
        planted_at = set()
        for f in range(N_FACTS):
            planted_at |= set(range(int(p.fact_start[b, f]), int(p.fact_start[b, f]) + int(p.fact_len[b, f])))
        query_from = int(p.answer_start[b].min()) - len(tokenizer(QUERY.format(key=p.keys[b][0])).input_ids)
        planted_at |= set(range(query_from, LENGTH))
        scored = {i + 1 for i, s in enumerate(p.scored[b].tolist()) if s}  # the targets that are scored
        assert scored == set(range(1, LENGTH)) - planted_at


def test_the_kl_on_planted_blocks_reads_only_original_text(tiny_model, planted):
    """A change of logits at planted positions only leaves every token metric unchanged."""
    tokenizer, blocks, p = planted
    model = tiny_model("llama")
    evaluator = ProxyEvaluator(model, p, batch_size=2)
    with torch.no_grad():
        logits = model(input_ids=p.input_ids[:, :-1]).logits
    noisy = logits.clone()
    noisy[~p.scored] += 5.0 * torch.randn_like(noisy[~p.scored])
    reference = reference_of(logits, p.input_ids[:, 1:], top_k=None)
    clean, changed = (token_stats(z, p.input_ids[:, 1:], reference) for z in (logits, noisy))
    for name in ("kl", "nll", "agree"):
        a, c = getattr(clean, name)[p.scored], getattr(changed, name)[p.scored]
        assert torch.equal(a, c)
    assert not torch.equal(clean.kl[~p.scored], changed.kl[~p.scored])
    assert evaluator.evaluate()["kl"] == 0.0


def test_bad_settings_are_refused():
    tokenizer = WordTokenizer()
    blocks = text_blocks(tokenizer, 1, 120)
    with pytest.raises(UserError, match=r"^proxy\.facts: 6 facts take \d+ of a block's 120 tokens"):
        plant_facts(tokenizer, blocks, 6)
    with pytest.raises(UserError, match=r"^proxy\.facts: 41; allowed: 0 to 40"):
        plant_facts(tokenizer, blocks, 41)
    none = plant_facts(tokenizer, blocks, 0)
    assert torch.equal(none.input_ids, blocks) and bool(none.scored.all()) and none.num_facts == 0


def test_fact_stats_by_hand():
    ids = torch.tensor([[0, 1, 2, 3]])  # facts answered by tokens 1..2 and by token 3
    answer_start, answer_len = torch.tensor([[1, 3]]), torch.tensor([[2, 1]])
    logits = torch.zeros(1, 3, 5)
    logits[0, 0, 1] = logits[0, 1, 2] = 10.0  # the first answer right at both positions
    logits[0, 2, 0] = 10.0  # the second wrong
    stats = fact_stats(logits, ids, answer_start, answer_len)
    assert stats.hit.tolist() == [1.0, 0.0]
    confident = torch.log1p(4 * torch.exp(torch.tensor(-10.0))).item()
    assert stats.nll[0].item() == pytest.approx(confident, abs=1e-6)
    assert stats.nll[1].item() == pytest.approx(10.0 + confident, rel=1e-5)


def test_retrieval_and_kl_come_from_one_forward_per_batch(tiny_model, planted):
    tokenizer, blocks, p = planted
    model = tiny_model("llama")
    calls = []
    model.register_forward_hook(lambda module, args, output: calls.append(1))
    evaluator = ProxyEvaluator(model, p, batch_size=2)
    calls.clear()
    measured = evaluator.measure()
    assert len(calls) == 2  # 3 blocks in batches of 2
    assert list(measured.metrics) == PROXY_METRICS.names()
    assert measured.metrics["kl"] == 0.0 and measured.metrics == {**measured.metrics, **evaluator.evaluate()}
    assert len(measured.per_block["kl"]) == N_BLOCKS and len(measured.per_fact["retrieval_acc"]) == N_BLOCKS * N_FACTS
    assert measured.per_fact["retrieval_acc"] == evaluator.original_per_fact["retrieval_acc"]
    assert evaluator.original["retrieval_acc"] == pytest.approx(sum(measured.per_fact["retrieval_acc"]) / 18)
    switcher = PlanSwitcher(model, {"linear": {"window": 4, "feature_dim": 8, "sinks": 2}})
    switcher.apply(LayerPlan.from_string("NLNL"))
    patched = evaluator.measure()
    assert patched.metrics["kl"] > 0 and patched.per_fact["retrieval_nll"] != measured.per_fact["retrieval_nll"]
    # token metrics: the mean over blocks weighted by each block's scored tokens
    tokens = p.scored.sum(1).tolist()
    assert patched.metrics["kl"] == pytest.approx(
        sum(v * n for v, n in zip(patched.per_block["kl"], tokens)) / sum(tokens), rel=1e-6)


def test_retrieval_metrics_match_a_plain_forward(tiny_model, planted):
    tokenizer, blocks, p = planted
    model = tiny_model("qwen3")
    got = ProxyEvaluator(model, p, batch_size=3).evaluate(["retrieval_nll", "retrieval_acc"])
    with torch.no_grad():
        logits = model(input_ids=p.input_ids[:, :-1]).logits
    hits, nlls = [], []
    for b in range(N_BLOCKS):
        for f in range(N_FACTS):
            s, n = int(p.answer_start[b, f]), int(p.answer_len[b, f])
            z, target = logits[b, s - 1:s - 1 + n], p.input_ids[b, s:s + n]
            hits.append(float((z.argmax(-1) == target).all()))
            nlls.append(torch.nn.functional.cross_entropy(z, target).item())
    assert got["retrieval_acc"] == pytest.approx(sum(hits) / len(hits))
    assert got["retrieval_nll"] == pytest.approx(sum(nlls) / len(nlls), rel=1e-5)


def test_plain_blocks_have_no_retrieval_metrics(tiny_model):
    blocks = torch.randint(3, 1000, (2, 17), generator=torch.Generator().manual_seed(0))
    evaluator = ProxyEvaluator(tiny_model("llama"), blocks)
    assert set(evaluator.evaluate()) == {"kl", "nll", "nll_delta", "top1_agreement"} and evaluator.original == {}
    assert isinstance(evaluator.blocks, PlantedBlocks) and bool(evaluator.blocks.scored.all())
    with pytest.raises(UserError, match="^proxy metric: 'retrieval_acc' needs planted facts"):
        evaluator.evaluate(["retrieval_acc"])


@pytest.mark.parametrize("plan", ["SSSS", "SLN1"])
def test_retrieval_by_generation_through_the_hybrid_cache_equals_retrieval_by_prefill(planted, tiny_model, plan):
    """A server answers each fact with decode steps through the hybrid cache; the proxy reads the same answers
    from one teacher-forced forward. Same facts found, same answer NLL (so the same argmax at every answer token:
    a random model finds none, the NLL is what tells), same token metrics."""
    blocks = planted[2].select(slice(0, 1))
    model = tiny_model("llama")
    settings = {"linear": {"window": 4, "feature_dim": 8, "sinks": 2}, "mixed1": {"kept_heads": [[0], [1], [0], [1]]}}
    switcher = PlanSwitcher(model, settings)
    prefill = ProxyEvaluator(model, blocks, batch_size=1)
    generated = ProxyEvaluator(model, blocks, generate=True)
    assert generated.original_per_fact["retrieval_acc"] == prefill.original_per_fact["retrieval_acc"]
    switcher.apply(LayerPlan.from_string(plan))
    by_prefill, by_generation = prefill.measure(), generated.measure()
    assert by_generation.per_fact["retrieval_acc"] == by_prefill.per_fact["retrieval_acc"]
    assert by_generation.per_fact["retrieval_nll"] == pytest.approx(by_prefill.per_fact["retrieval_nll"], abs=1e-4)
    for name in ("kl", "top1_agreement", "nll"):
        assert by_generation.per_block[name] == pytest.approx(by_prefill.per_block[name], abs=1e-4)


def test_blocks_with_shared_keys_are_answered_as_one_batch_with_the_same_results(tiny_model):
    """Shared keys put every block's queries at the same positions (the word tokenizer gives every digit one
    token): one group, answered by batched decode steps, with the per-fact results of one block at a time."""
    tokenizer = WordTokenizer()
    blocks = text_blocks(tokenizer, n=3, length=300)
    planted = plant_facts(tokenizer, blocks, 4, seed=5, shared_keys=True)
    assert planted.keys[0] == planted.keys[1] == planted.keys[2] and planted.answers[0] != planted.answers[1]
    assert (planted.answer_start == planted.answer_start[0]).all()
    model = tiny_model("llama")
    PlanSwitcher(model, {"linear": {"window": 4, "feature_dim": 8, "sinks": 2}}).apply(LayerPlan.from_string("SLNL"))
    batched = ProxyEvaluator(model, planted, generate=True)
    assert batched._groups() == [[0, 1, 2]]
    one_by_one = ProxyEvaluator(model, planted, batch_size=1)
    got, expected = batched.measure(), one_by_one.measure()
    assert got.per_fact["retrieval_acc"] == expected.per_fact["retrieval_acc"]
    assert got.per_fact["retrieval_nll"] == pytest.approx(expected.per_fact["retrieval_nll"], abs=1e-4)
    assert got.per_block["kl"] == pytest.approx(expected.per_block["kl"], abs=1e-4)
