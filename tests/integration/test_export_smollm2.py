"""Export on the real SmolLM2: a half-softmax folder (linear parts at their initial weights: exactness does not
depend on training) loads with plain transformers in a fresh interpreter with no layerboost module
importable, gives the patched model's logits and its cached greedy tokens through plain `generate`, with
the hybrid cache. 60-100 s measured on the 2-core CPU shared with other busy processes."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from layerboost_core.cache import hybrid_generate
from layerboost_core.export import export_hybrid
from layerboost_core.models import load_model
from layerboost_core.patch import PlanSwitcher
from layerboost_core.plan import LayerPlan
from tests.conftest import NO_LAYERBOOST_PRELUDE

pytestmark = pytest.mark.integration

SETTINGS = {"linear": {"window": 64, "feature_dim": 32, "sinks": 4}}  # the shipped defaults (conf/config.yaml)
STEPS = 8

SCRIPT = NO_LAYERBOOST_PRELUDE + r"""

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

folder, data_path, out_path = sys.argv[1:]
data = torch.load(data_path)
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
ids = AutoTokenizer.from_pretrained(folder)(data["text"], return_tensors="pt").input_ids
with torch.no_grad():
    logits = model(ids).logits
out = model.generate(ids, max_new_tokens=data["steps"], do_sample=False, return_dict_in_generate=True)
torch.save({"ids": ids, "logits": logits, "tokens": out.sequences, "cache": type(out.cache).__name__}, out_path)
"""


def test_exported_smollm2_runs_under_plain_transformers(tmp_path):
    loaded = load_model("smollm2-135m", "builtin:smollm2-135m", device="cpu", dtype="float32")
    switcher = PlanSwitcher(loaded.model, SETTINGS)
    plan = LayerPlan(tuple("softmax" if i % 2 == 0 else "linear" for i in range(switcher.num_layers)))
    switcher.apply(plan)
    folder = export_hybrid(switcher, plan, loaded.tokenizer, tmp_path / "export",
                           {"model": loaded.info, "settings": SETTINGS, "bank_id": None})
    text = "The history of the printing press begins in the fifteenth century, when " * 8  # > window + sinks
    torch.save({"text": text, "steps": STEPS}, tmp_path / "data.pt")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "hf_modules"))
    result = subprocess.run([sys.executable, "-I", "-c", SCRIPT, str(folder), str(tmp_path / "data.pt"),
                             str(tmp_path / "out.pt")], cwd=tmp_path, env=env, stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = torch.load(tmp_path / "out.pt")

    ids = loaded.tokenizer(text, return_tensors="pt").input_ids
    assert torch.equal(out["ids"], ids) and ids.shape[1] > 68
    with torch.no_grad():
        expected = loaded.model(ids, use_cache=False).logits
    assert (out["logits"] - expected).abs().max().item() < 1e-4
    tokens, _ = hybrid_generate(loaded.model, ids, STEPS)
    assert torch.equal(out["tokens"], tokens)
    assert out["cache"] == "LayerBoostCache"
