"""The CLI and the core library on the real built-in SmolLM2 (marked integration; runs in CI offline)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.integration

SMALL_TRANSFER = ["transfer.batches=2", "transfer.steps_per_batch=1", "data.blocks.heldout=2", "progress=false"]


def run_cli(*args, env=None, cwd=None):
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "layerboost", *args], capture_output=True, text=True,
                          env=full_env, cwd=cwd, timeout=600)


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_unknown_model_name(tmp_path):
    result = run_cli("transfer", "model=llama4", f"output_dir={tmp_path}")
    assert_one_line_error(result, "model: unknown value 'llama4'", "llama3-8b")


def test_unsupported_family(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=2, n_embd=64, n_head=2).save_pretrained(tmp_path / "gpt2")
    result = run_cli("transfer", f"model={tmp_path / 'gpt2'}", f"output_dir={tmp_path}")
    assert_one_line_error(result, "model family: 'gpt2' is not supported", "llama, mistral, qwen2, qwen3")


def test_offline_hub_id(tmp_path):
    result = run_cli("transfer", "model=some-org/some-model-that-is-not-cached", f"output_dir={tmp_path}")
    assert_one_line_error(result, "model.source", "some-org/some-model-that-is-not-cached", "offline")


def test_plan_of_wrong_length(tmp_path):
    result = run_cli("eval", "plan=SSL", "eval=none", f"output_dir={tmp_path}", *SMALL_TRANSFER)
    assert_one_line_error(result, "plan: has 3 layers but the model has 30")
    assert not (tmp_path / "eval").exists()


def test_unknown_option_name_in_plan_json(tmp_path):
    import json

    from layerboost_core.plan import PLAN_SCHEMA

    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"schema": PLAN_SCHEMA, "layers": ["softmax"] * 29 + ["lineer"]}))
    result = run_cli("eval", f"plan={path}", "eval=none", f"output_dir={tmp_path}", *SMALL_TRANSFER)
    assert_one_line_error(result, "plan: layer 29 has unknown option 'lineer'", "linear")


@pytest.fixture(scope="module")
def smollm2():
    from layerboost_core.models import load_model

    return load_model("smollm2-135m", "builtin:smollm2-135m", device="cpu", dtype="float32")


def test_all_softmax_plan_reproduces_the_model(smollm2):
    from layerboost_core.patch import PlanSwitcher
    from layerboost_core.plan import LayerPlan

    ids = smollm2.tokenizer("The quick brown fox jumps over the lazy dog. " * 8, return_tensors="pt").input_ids
    with torch.no_grad():
        before = smollm2.model(ids).logits
        switcher = PlanSwitcher(smollm2.model, {"linear": {"window": 16, "feature_dim": 8, "sinks": 2}})
        switcher.apply(LayerPlan.from_string("LN" * 15))
        patched = smollm2.model(ids).logits
        switcher.apply(LayerPlan.uniform("softmax", 30))
        after = smollm2.model(ids).logits
    assert smollm2.num_layers == 30 and smollm2.info["model_type"] == "llama"
    assert (after - before).abs().max().item() <= 1e-5
    assert (patched - before).abs().max().item() > 1e-2  # the patched plan really changed the model


def test_bank_is_cached_and_rebuilt_when_corrupt(tmp_path, monkeypatch, smollm2):
    from layerboost_core.data import make_splits
    from layerboost_core.patch import PlanSwitcher
    from layerboost_core.transfer import TransferSettings, bank_id, bank_path, load_or_build_bank

    monkeypatch.setenv("LAYERBOOST_CACHE", str(tmp_path))
    splits = make_splits(smollm2.tokenizer, seq_len=128, blocks={"calibration": 1, "train": 4, "heldout": 2})
    settings = {"linear": {"window": 16, "feature_dim": 8, "sinks": 2}}
    transfer = TransferSettings(batches=1, batch_size=2, steps_per_batch=1)
    first = load_or_build_bank(PlanSwitcher(smollm2.model, settings), smollm2.info, splits, settings, transfer, progress=False)
    path = bank_path(smollm2.info["name"], bank_id(smollm2.info, splits.hashes["train"], settings, transfer))
    assert path.exists() and "training" in first.meta
    again = load_or_build_bank(PlanSwitcher(smollm2.model, settings), smollm2.info, splits, settings, transfer, progress=False)
    assert "training" in again.meta and again.id == first.id
    for a, b in zip(first.parts["linear"], again.parts["linear"]):
        assert all(torch.equal(a[k], b[k]) for k in a)
    path.write_bytes(b"not a bank")
    rebuilt = load_or_build_bank(PlanSwitcher(smollm2.model, settings), smollm2.info, splits, settings, transfer, progress=False)
    assert rebuilt.id == first.id and path.stat().st_size > 100
