"""Per-head copy scores (which KV heads retrieve the planted facts) and the kept heads of the `mixed` options."""
from __future__ import annotations

import pytest
import torch

from layerboost_core.facts import plant_facts
from layerboost_core.head_scores import cached_head_scores, head_score_rows, head_scores, kept_heads
from layerboost_core.patch import PlanSwitcher
from tests.unit.test_facts import WordTokenizer, text_blocks


def test_kept_heads_are_the_top_k_of_each_layer_in_head_order():
    scores = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.5, 0.0], [0.0, 0.0, 0.9]])
    assert kept_heads(scores, 1) == [[1], [0], [2]]  # a tie goes to the lower index
    assert kept_heads(scores, 2) == [[1, 2], [0, 1], [0, 2]]
    rows = head_score_rows(scores)
    assert rows[1] == {"layer": 0, "kv_head": 1, "score": pytest.approx(0.7), "rank": 0}
    assert [r["rank"] for r in rows[3:6]] == [0, 1, 2]


@pytest.fixture
def scored(tiny_model):
    tokenizer = WordTokenizer()
    blocks = plant_facts(tokenizer, text_blocks(tokenizer, 2, 300), 3, seed=1)
    model = tiny_model("llama")
    return model, blocks, head_scores(PlanSwitcher(model, {}), blocks)


def test_scores_are_attention_weights_per_layer_and_kv_head(scored):
    model, blocks, scores = scored
    assert scores.shape == (model.config.num_hidden_layers, model.config.num_key_value_heads)
    assert bool((scores >= 0).all()) and bool((scores <= 1).all())


def test_scores_are_the_weight_on_the_copied_token(scored):
    """By hand for layer 0: softmax(q k / sqrt(d)) at each answer position, read at the fact's same token."""
    from layerboost_core.transfer import teacher_pass

    model, blocks, scores = scored
    switcher = PlanSwitcher(model, {})
    weights = []
    for b in range(blocks.num_blocks):
        capture = teacher_pass(switcher, blocks.input_ids[b:b + 1, :-1])
        attn = switcher.original[0]
        q, k, _ = switcher.family.project_qkv(attn, capture.inputs[0], capture.position_embeddings[0])
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        for start, length, source in zip(blocks.answer_start[b].tolist(), blocks.answer_len[b].tolist(),
                                         blocks.source_start[b].tolist()):
            for j in range(length):
                at = start - 1 + j
                scores_at = (q[0, :, at].unsqueeze(1) @ k[0, :, : at + 1].transpose(-1, -2)).squeeze(1)  # (Hq, T)
                w = torch.softmax(scores_at.float() * attn.scaling, dim=-1)
                weights.append(w[:, source + j])  # (Hq,)
    kv_heads = model.config.num_key_value_heads
    expected = torch.stack(weights).view(len(weights), kv_heads, -1).amax(2).mean(0)  # per answer token: the group's best
    assert torch.allclose(scores[0], expected, atol=1e-5)


def test_scores_are_cached(scored, tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("LAYERBOOST_CACHE", str(tmp_path))
    model, blocks, scores = scored
    info = {"name": "tiny", "fingerprint": "f00d"}
    first = cached_head_scores(PlanSwitcher(model, {}), info, blocks)
    assert torch.allclose(first, scores)
    monkeypatch.setattr("layerboost_core.head_scores.head_scores", lambda *a: pytest.fail("measured again"))
    assert torch.equal(cached_head_scores(PlanSwitcher(model, {}), info, blocks), first)
