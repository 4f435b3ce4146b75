"""Shared fixtures: tiny deterministic random models built from a config (no tokenizer, no files, no network).

Unit and contract tests use these; only tests marked `integration` touch the real SmolLM2.
"""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from layerboost_core.models import tiny_config

# The test machine is shared with timing measurements: one thread keeps the suite from competing for cores,
# and the tensors here are far too small to gain from more.
torch.set_num_threads(1)

# Families with a tiny config; a new family adds its model_type here and gets the family tests.
MODEL_TYPES = ("llama", "qwen3", "qwen2", "mistral", "gemma3_text")
# Families whose attention modules the option contract suite checks: the plain one, and Gemma 3 (q/k norms,
# per-layer-type RoPE, query_pre_attn_scalar scaling, local and global layers).
CONTRACT_MODEL_TYPES = ("llama", "gemma3_text")
# The two families whose attention differs (qwen3 adds q/k norms); the patch tests run on both.
MAIN_MODEL_TYPES = ("llama", "qwen3")

LINEAR_SETTINGS = {"linear": {"window": 4, "feature_dim": 8}}

_built: dict[tuple[str, int], torch.nn.Module] = {}


def build_tiny_model(model_type: str, num_layers: int = 4) -> torch.nn.Module:
    """A fresh copy of the deterministic tiny model: fp32, eval mode, weights from torch.manual_seed(0).

    Built once per process and deep-copied, so a test that patches its model never affects another test.
    """
    key = (model_type, num_layers)
    if key not in _built:
        state = torch.random.get_rng_state()
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(tiny_config(model_type, num_layers))
        torch.random.set_rng_state(state)
        _built[key] = model.to(torch.float32).eval()
    return copy.deepcopy(_built[key])


@pytest.fixture
def tiny_model():
    """Factory: `tiny_model("qwen3", num_layers=4)` returns a fresh tiny model of that family."""
    return build_tiny_model


@pytest.fixture
def token_ids():
    """A deterministic (2, 16) batch of token ids inside the tiny models' vocabulary."""
    generator = torch.Generator().manual_seed(1234)
    return torch.randint(3, 1000, (2, 16), generator=generator)


# First lines of a script run in a fresh interpreter where importing any layerboost module fails, so only an
# exported folder's own code can serve its model (the export tests).
NO_LAYERBOOST_PRELUDE = r"""
import sys
class NoLayerBoost:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0].startswith("layerboost"):
            raise ImportError(f"{name} must not be imported here")
sys.meta_path.insert(0, NoLayerBoost())
"""
