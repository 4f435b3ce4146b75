"""The real SmolLM2 on the offline lm-eval tasks: the unpatched model finds the pass key far above chance.

About 90 s on 2 CPU cores (one 1024-token forward pass per pass-key example: the five keys share all but
their last token, so lm-eval scores them together).
"""
from __future__ import annotations

import pytest

from layerboost_core.data import make_splits
from layerboost_core.lm_eval_tasks import evaluate_tasks, write_offline_tasks
from layerboost_core.models import load_model

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2-135m", "builtin:smollm2-135m", device="cpu")


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory, smollm2):
    splits = make_splits(smollm2.tokenizer, blocks={"calibration": 1, "train": 1, "heldout": 1})
    return write_offline_tasks(tmp_path_factory.mktemp("tasks"), splits.documents["heldout"], smollm2.tokenizer)


def test_unpatched_smollm2_finds_the_pass_key(monkeypatch, smollm2, task_dir):
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    # measured: 40/40 over all default examples; chance is 0.2
    scores = evaluate_tasks(smollm2.model, smollm2.tokenizer, ["lb_passkey"], task_dir, batch_size=4, limit=10)
    assert scores["lb_passkey"] >= 0.6


def test_unpatched_smollm2_recalls_pairs_above_chance(monkeypatch, smollm2, task_dir):
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    # measured: 0.35 on all 40 default examples (8 pairs: chance 0.125); cloze 0.75
    scores = evaluate_tasks(smollm2.model, smollm2.tokenizer, ["lb_mqar"], task_dir, batch_size=8, limit=16)
    assert scores["lb_mqar"] > 0.125
