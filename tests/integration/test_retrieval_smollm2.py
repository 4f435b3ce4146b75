"""The real SmolLM2 on facts planted in a 2,048-token held-out block: the original finds them, all-`linear`
(a model of untrained feature maps is enough for this) does not, and a few heads do the copying.

About 20 s on 2 CPU cores: one block, a handful of forwards.
"""
from __future__ import annotations

import pytest
import torch

from layerboost_core.data import make_splits
from layerboost_core.facts import plant_facts
from layerboost_core.head_scores import head_scores
from layerboost_core.metrics import ProxyEvaluator
from layerboost_core.models import load_model
from layerboost_core.patch import PlanSwitcher
from layerboost_core.plan import LayerPlan

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def planted():
    torch.set_num_threads(2)
    smollm2 = load_model("smollm2-135m", "builtin:smollm2-135m", device="cpu")
    splits = make_splits(smollm2.tokenizer, seq_len=2048, blocks={"calibration": 1, "train": 1, "heldout": 1},
                         mix_sources=True)
    return smollm2, plant_facts(smollm2.tokenizer, splits.heldout, 16)


def test_the_original_finds_the_facts_and_a_model_without_long_attention_does_not(planted):
    smollm2, blocks = planted
    proxy = ProxyEvaluator(smollm2.model, blocks, batch_size=1)
    assert proxy.original["retrieval_acc"] >= 14 / 16  # measured: 16/16 (47/48 over three blocks)
    switcher = PlanSwitcher(smollm2.model, {"linear": {"window": 64, "feature_dim": 32, "sinks": 4}})
    switcher.apply(LayerPlan.uniform("linear", switcher.num_layers))  # a 64-token window: the facts are out of reach
    assert proxy.evaluate(["retrieval_acc"])["retrieval_acc"] <= 2 / 16
    switcher.restore()


def test_a_few_heads_do_the_copying(planted):
    smollm2, blocks = planted
    scores = head_scores(PlanSwitcher(smollm2.model, {}), blocks)
    assert scores.shape == (30, 3)
    flat = scores.flatten().sort(descending=True).values
    # measured: layer 18 head 2 at 0.94, layer 17 head 1 at 0.78, then 0.26; the median head under 0.002
    assert flat[1] >= 0.5 and float(flat.median()) < 0.01
