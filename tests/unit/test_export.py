"""Export: a plan becomes a folder that plain transformers loads (`trust_remote_code=True`) with no LayerBoost
module importable, and runs exactly as the project's patched model: same logits, greedy `generate` equal to
recomputation at every step with the hybrid cache by default, the cache holding the cost model's bytes. Wrong
caches, tampered folders and foreign plans are refused."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

from layerboost_core import load_hybrid
from layerboost_core.attention import OPTIONS
from layerboost_core.cache import HybridCache
from layerboost_core.errors import UserError
from layerboost_core.export import CARD_FILE, export_hybrid, export_plan, remote_files
from layerboost_core.families import FAMILIES
from layerboost_core.hybrid_folder import METRICS_FILE, PARTS_FILE, save_hybrid
from layerboost_core.models import fingerprint
from layerboost_core.patch import PlanSwitcher
from layerboost_core.plan import LayerPlan
from layerboost_core.remote_code import modeling_layerboost
from layerboost_surrogates.cost_model import kv_bytes_per_sequence, softmax_cached_tokens
from tests.conftest import MODEL_TYPES, NO_LAYERBOOST_PRELUDE

# Window 4 + 2 sinks: the 11-token prompt already slides the window, decoding moves it further. `mixed1`
# layers keep one of the two KV heads softmax (which one differs per layer).
SETTINGS = {"linear": {"window": 4, "feature_dim": 8, "sinks": 2}, "mixed1": {"kept_heads": [[1], [1], [0], [1]]}}
PLAN = LayerPlan.from_string("SLNL")  # all three options, softmax and linear layers both holding a cache
# Per family: the plans exported. Gemma 3's tiny layers alternate local (window 8, shorter than the prompt) and
# global: a softmax layer of each, and mixed layers of each kind.
PLANS = {"default": {"gemma3_text": LayerPlan.from_string("SSLN")},
         "mixed": {"gemma3_text": LayerPlan.from_string("11SL"), None: LayerPlan.from_string("S1LN")}}
STEPS = 6
CONTEXT = {"model": {"name": "tiny", "source": "tiny:llama"}, "settings": SETTINGS, "bank_id": "bank123",
           "metrics": {"kl": {"value": 0.1234, "fidelity": "proxy"},
                       "lm_eval:arc_easy": {"value": 0.41, "fidelity": "lm-eval"}},
           "workload": {"prefill": 1024, "decode": 32, "batch": 1}}

# Runs in a fresh interpreter (-I: no PYTHONPATH, no cwd on sys.path) where importing any layerboost module
# fails, so only the folder's own code can serve the model.
REMOTE_SCRIPT = NO_LAYERBOOST_PRELUDE + r"""

import torch
from transformers import AutoModelForCausalLM, DynamicCache

folder, data_path, out_path = sys.argv[1:]
data = torch.load(data_path)
out = {}
try:
    AutoModelForCausalLM.from_pretrained(folder)  # no trust_remote_code: must refuse, never load all-softmax
    out["plain_load"] = "loaded"
except Exception as error:
    out["plain_load"] = f"{type(error).__name__}: {error}"
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
with torch.no_grad():
    out["logits"] = model(data["ids"]).logits
generated = model.generate(data["ids"], max_new_tokens=data["steps"], do_sample=False, output_logits=True,
                           return_dict_in_generate=True)
cache = generated.cache
out["tokens"], out["step_logits"] = generated.sequences, torch.stack(generated.logits, dim=1)
out["cache_type"], out["cache_bytes"] = type(cache).__name__, cache.kv_bytes()
out["linear_kv_lengths"] = {i: s.values.shape[2] for i, s in cache.linear_states.items()}
out["linear_heads"] = {i: s.values.shape[1] for i, s in cache.linear_states.items()}
out["softmax_kv_lengths"] = {i: layer.keys.shape[2] for i, layer in enumerate(cache.layers)
                             if getattr(layer, "keys", None) is not None}
out["softmax_heads"] = {i: layer.keys.shape[1] for i, layer in enumerate(cache.layers)
                        if getattr(layer, "keys", None) is not None}
for name, call in {"generate": lambda: model.generate(data["ids"], max_new_tokens=2, cache=DynamicCache()),
                   "forward": lambda: model(data["ids"], past_key_values=DynamicCache())}.items():
    try:
        call()
        out[f"wrong_cache_{name}"] = "accepted"
    except ValueError as error:
        out[f"wrong_cache_{name}"] = str(error)
out["layerboost_modules"] = [m for m in sys.modules if m.startswith("layerboost")]
torch.save(out, out_path)
"""


def trained_switcher(model, plan: LayerPlan = PLAN) -> PlanSwitcher:
    """A switcher whose `linear` parts are away from their init (as a trained bank's are), `plan` applied."""
    switcher = PlanSwitcher(model, SETTINGS)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        switcher.apply(LayerPlan.uniform("linear", switcher.num_layers))
        with torch.no_grad():
            for part in switcher.trainable_parts("linear"):
                for parameter in part.parameters():
                    parameter.add_(0.3 * torch.randn_like(parameter))
    switcher.apply(plan)
    return switcher


def prompt(batch: int = 2, length: int = 11) -> torch.Tensor:
    return torch.randint(3, 1000, (batch, length), generator=torch.Generator().manual_seed(length))


@torch.no_grad()
def recomputed_greedy(model, ids: torch.Tensor, steps: int):
    """Greedy decoding recomputing the whole sequence each step: (all tokens, (B, steps, V) logits)."""
    tokens, logits = ids, []
    for _ in range(steps):
        logits.append(model(tokens, use_cache=False).logits[:, -1])
        tokens = torch.cat([tokens, logits[-1].argmax(-1, keepdim=True)], dim=1)
    return tokens, torch.stack(logits, dim=1)


def run_without_layerboost(folder, data: dict, tmp_path) -> dict:
    """REMOTE_SCRIPT's results for `folder`, from an interpreter outside the repository."""
    torch.save(data, tmp_path / "data.pt")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "hf_modules"), OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-I", "-c", REMOTE_SCRIPT, str(folder), str(tmp_path / "data.pt"),
                             str(tmp_path / "out.pt")], cwd=tmp_path, env=env, stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(tmp_path / "out.pt")


@pytest.mark.parametrize("plans", PLANS)
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_plain_transformers_runs_the_exported_plan_exactly(tiny_model, model_type, plans, tmp_path):
    model = tiny_model(model_type)
    plan = PLANS[plans].get(model_type, PLANS[plans].get(None, PLAN))
    switcher = trained_switcher(model, plan)
    folder = export_hybrid(switcher, plan, None, tmp_path / "export", CONTEXT)
    ids = prompt()
    with torch.no_grad():
        expected_logits = model(ids, use_cache=False).logits
    expected_tokens, expected_steps = recomputed_greedy(model, ids, STEPS)

    out = run_without_layerboost(folder, {"ids": ids, "steps": STEPS}, tmp_path)

    assert out["layerboost_modules"] == []
    assert "trust_remote_code" in out["plain_load"]
    assert torch.allclose(out["logits"], expected_logits, atol=1e-4, rtol=0)
    assert torch.equal(out["tokens"], expected_tokens)
    assert torch.allclose(out["step_logits"], expected_steps, atol=1e-4, rtol=0)
    assert out["cache_type"] == "LayerBoostCache"
    seen = ids.shape[1] + STEPS - 1  # the last token generated is never fed back
    sinks, window = SETTINGS["linear"]["sinks"], SETTINGS["linear"]["window"]
    kept = softmax_cached_tokens(model.config, seen)  # a local softmax layer keeps only its window
    heads = model.config.num_key_value_heads
    state_heads = {"linear": heads, "mixed1": heads - 1}  # a mixed1 layer: one head softmax, the others linear
    kv_heads = {"softmax": heads, "mixed1": 1}
    assert out["linear_kv_lengths"] == {i: sinks + window for i, o in enumerate(plan.layers) if o in state_heads}
    assert out["linear_heads"] == {i: state_heads[o] for i, o in enumerate(plan.layers) if o in state_heads}
    assert out["softmax_kv_lengths"] == {i: kept[i] for i, o in enumerate(plan.layers) if o in kv_heads}
    assert out["softmax_heads"] == {i: kv_heads[o] for i, o in enumerate(plan.layers) if o in kv_heads}
    assert out["cache_bytes"] == ids.shape[0] * kv_bytes_per_sequence(plan, model.config, SETTINGS, seen, 4)
    for call in ("generate", "forward"):
        assert "needs its own cache" in out[f"wrong_cache_{call}"] and "DynamicCache" in out[f"wrong_cache_{call}"]


def test_the_remote_code_knows_every_option_and_its_code():
    assert modeling_layerboost.CODES == {name: OPTIONS.get(name).code for name in OPTIONS}
    assert set(modeling_layerboost.MODULES) == set(OPTIONS.names())


def test_the_remote_class_table_covers_every_family():
    """One row per registered family, with the family's q/k norms; auto_map finds each class by its name."""
    table = modeling_layerboost.CLASSES
    assert sorted(table) == sorted(FAMILIES.names())
    for model_type, (config_class, model_class) in table.items():
        assert model_class.qk_norm == FAMILIES.get(model_type).qk_norm, model_type
        assert config_class.model_type == f"layerboost_{model_type}"
        assert getattr(modeling_layerboost, config_class.__name__) is config_class
        assert getattr(modeling_layerboost, model_class.__name__) is model_class


def test_the_folder_ships_the_inference_modules_verbatim():
    """The remote file and the inference modules it imports, found as transformers looks for them (relative
    imports resolved next to each file in the flat folder); nothing else of the project."""
    files = remote_files()
    inference = Path(modeling_layerboost.__file__).parents[1] / "inference"
    assert files.pop("modeling_layerboost.py") == Path(modeling_layerboost.__file__)
    assert all(source.parent == inference for source in files.values())
    assert {"hybrid_cache.py", "linear_attention.py", "mixed_attention.py", "no_attention.py", "linear_kernels.py",
            "flex.py", "qkv.py"} <= set(files)


def test_a_family_without_remote_classes_is_refused(tiny_model, tmp_path, monkeypatch):
    monkeypatch.delitem(modeling_layerboost.CLASSES, "mistral")
    with pytest.raises(UserError, match=r"^model family: 'mistral' cannot be exported \(no remote classes in "
                                        r"modeling_layerboost.py\); exportable families: gemma3_text, llama, "):
        export_hybrid(trained_switcher(tiny_model("mistral")), PLAN, None, tmp_path / "export", CONTEXT)
    assert not (tmp_path / "export").exists()


@pytest.mark.parametrize("plan", [PLAN, PLANS["mixed"][None]], ids=str)
def test_load_hybrid_verifies_and_generates_with_the_hybrid_cache(tiny_model, plan, tmp_path):
    """The project's own loader rebuilds the plan (mixed layers from the folder's settings); the learned parts of
    every layer running them are in the bank-shaped copy."""
    from safetensors.torch import load_file

    model = tiny_model("llama")
    switcher = trained_switcher(model, plan)
    folder = export_hybrid(switcher, plan, None, tmp_path / "export", CONTEXT)
    assert {int(key.split(".")[1]) for key in load_file(str(folder / PARTS_FILE))} == \
        {i for i, o in enumerate(plan.layers) if o in ("linear", "mixed1")}
    ids = prompt(batch=1)
    expected_tokens, _ = recomputed_greedy(model, ids, 3)
    hybrid = load_hybrid(folder, device="cpu", dtype="float32")
    assert hybrid.plan == plan
    with torch.no_grad():
        assert torch.equal(hybrid.model(ids, use_cache=False).logits, model(ids, use_cache=False).logits)
    generated = hybrid.model.generate(ids, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    assert torch.equal(generated.sequences, expected_tokens)
    assert isinstance(generated.cache, HybridCache)
    with pytest.raises(UserError, match=rf"^cache: the model runs plan {plan} and needs HybridCache\(model\), not "
                                        r"DynamicCache"):
        hybrid.model.generate(ids, max_new_tokens=1, cache=DynamicCache())


def _edit_weights(folder):
    raw = bytearray((folder / "model.safetensors").read_bytes())
    raw[-1] ^= 0xFF
    (folder / "model.safetensors").write_bytes(bytes(raw))


def _edit_config_plan(folder):
    config = json.loads((folder / "config.json").read_text())
    config["layerboost_plan"][2] = "softmax"
    (folder / "config.json").write_text(json.dumps(config))


def _edit_remote_code(folder):
    with open(folder / "modeling_layerboost.py", "a") as handle:
        handle.write("\n# edited\n")


@pytest.mark.parametrize("edit, name", [(_edit_weights, "model.safetensors"), (_edit_config_plan, "config.json"),
                                        (_edit_remote_code, "modeling_layerboost.py")])
def test_a_tampered_export_is_refused(tiny_model, tmp_path, edit, name):
    folder = export_hybrid(trained_switcher(tiny_model("llama")), PLAN, None, tmp_path / "export", CONTEXT)
    edit(folder)
    with pytest.raises(UserError, match=rf"^plan: hybrid folder '.*' is refused: {name} changed since it was saved"):
        load_hybrid(folder, device="cpu", dtype="float32")


def _plan_file(tmp_path, **changes) -> str:
    data = PLAN.to_json(**{**CONTEXT, **changes})
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(data))
    return str(path)


def test_a_plan_for_another_model_is_refused(tiny_model, tmp_path):
    model = tiny_model("llama")
    info = {"name": "tiny", "fingerprint": fingerprint(model), "num_layers": 4}
    foreign = _plan_file(tmp_path, model={"name": "other", "fingerprint": "0123456789abcdef"})
    with pytest.raises(UserError, match=r"^plan: made for model fingerprint 0123456789abcdef \(other\), but the "
                                        r"loaded model tiny has fingerprint"):
        export_plan(foreign, info, SETTINGS)
    with pytest.raises(UserError, match=r"^plan: has 3 layers but the model has 4$"):
        export_plan("SLN", info, SETTINGS)
    other_settings = _plan_file(tmp_path, model={"name": "tiny", "fingerprint": info["fingerprint"]},
                                settings={"linear": {"window": 64, "feature_dim": 8, "sinks": 2}})
    with pytest.raises(UserError, match=r"^plan: '.*plan.json' was measured with option settings .*\"window\": 64"):
        export_plan(other_settings, info, SETTINGS)
    plan, data = export_plan(_plan_file(tmp_path, model={"name": "tiny", "fingerprint": info["fingerprint"]}),
                             info, SETTINGS)
    assert plan == PLAN and data["metrics"]["kl"]["value"] == 0.1234


def test_model_card_and_heal_folder(tiny_model, tmp_path):
    switcher = trained_switcher(tiny_model("llama"))
    metrics = {"before": {"kl": 0.5}, "after": {"kl": 0.25}, "curve": []}
    folder = save_hybrid(tmp_path / "healed", switcher, PLAN, None, CONTEXT, metrics)
    card = (folder / CARD_FILE).read_text()
    assert "Plan `SLNL`" in card and "1 softmax, 2 linear, 1 none of 4 layers" in card and "healed" in card
    assert "| kl | 0.1234 | proxy |" in card and "| lm_eval:arc_easy | 0.41 | lm-eval |" in card
    assert "- kl: 0.5 -> 0.25" in card and "trust_remote_code=True" in card
    assert json.loads((folder / METRICS_FILE).read_text())["after"] == {"kl": 0.25}
    assert json.loads((folder / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"] == \
        "modeling_layerboost.LayerBoostLlamaForCausalLM"
    assert switcher.plan == PLAN  # writing left the plan in place
