"""Healing: distillation lowers the held-out KL, an interrupted run resumes to the same result, the hybrid
folder round-trips exactly and refuses tampering, and the LoRA path merges into plain weights."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from layerboost_core import load_hybrid
from layerboost.cli import main
from layerboost_core.errors import UserError
from layerboost_core.heal import HealSettings, LoraSettings, batch_indices, heal_plan, lr_at
from layerboost_core.hybrid_folder import MANIFEST, PARTS_FILE, PLAN_FILE, save_hybrid
from layerboost_core.metrics import ProxyEvaluator
from layerboost_core.models import tiny_config
from layerboost_core.patch import PlanSwitcher
from layerboost_core.plan import LayerPlan

SETTINGS = {"linear": {"window": 4, "feature_dim": 8, "sinks": 1}}
PLAN = LayerPlan.from_string("LSLN")  # half the layers not softmax, both replacements present
VOCAB = 256


def sharp_tiny_model() -> torch.nn.Module:
    """A tiny Llama whose outputs depend on attention: larger init than the default (whose next-token
    distributions are almost uniform, so every plan is within 0.01 nats of the original) and a small vocab."""
    config = tiny_config("llama", 4)
    config.vocab_size, config.initializer_range = VOCAB, 0.1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
    model.eval().requires_grad_(False)
    return model


def blocks(rows: int, seed: int) -> torch.Tensor:
    return torch.randint(3, VOCAB, (rows, 32), generator=torch.Generator().manual_seed(seed))


TRAIN, HELDOUT = blocks(64, 0), blocks(8, 1)


def setup():
    """(switcher, proxy) on a fresh model: the proxy holds the unpatched model's held-out distributions."""
    model = sharp_tiny_model()
    switcher = PlanSwitcher(model, SETTINGS)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)  # feature maps draw their init from the global RNG: the same "bank" every time
        switcher.apply(LayerPlan.uniform("linear", 4))
    switcher.restore()
    return switcher, ProxyEvaluator(model, HELDOUT)


def settings(**changes) -> HealSettings:
    base = dict(tokens=12 * 128, lr=5e-2, batch_size=4, seq_len=32, eval_every=512, checkpoint_every=256,
                lora=LoraSettings(enabled=False))  # the linear parts alone unless a test asks for adapters
    return HealSettings(**{**base, **changes})


def linear_state(switcher, plan=PLAN) -> dict[str, torch.Tensor]:
    return {f"{i}.{k}": v.clone() for i, o in enumerate(plan.layers) if o == "linear"
            for k, v in switcher.module(i, "linear").learned.state_dict().items()}


@torch.no_grad()
def logits(model, ids):
    return model(ids, use_cache=False).logits


def test_heal_lowers_the_heldout_kl():
    switcher, proxy = setup()
    result = heal_plan(switcher, PLAN, TRAIN, proxy, settings(tokens=40 * 128, eval_every=1280))
    assert [p["tokens"] for p in result.curve] == [0, 1280, 2560, 3840, 5120]
    assert result.before["kl"] > 0.1
    assert result.after["kl"] < 0.85 * result.before["kl"]  # measured 0.75x
    assert result.after["top1_agreement"] > result.before["top1_agreement"]
    assert str(switcher.plan) == str(PLAN)  # left running the healed plan
    assert proxy.evaluate()["kl"] == pytest.approx(result.after["kl"])


class Stop(Exception):
    pass


@pytest.mark.parametrize("lora", [False, True], ids=["linear-parts", "with-lora"])
def test_an_interrupted_run_resumes_to_the_same_result(tmp_path, lora):
    heal = settings(lora=LoraSettings(enabled=lora, r=4, lr=1e-3))
    switcher, proxy = setup()
    straight = heal_plan(switcher, PLAN, TRAIN, proxy, heal)
    expected_state, expected_logits = linear_state(switcher), logits(switcher.model, HELDOUT)

    checkpoint = tmp_path / "heal.ckpt"

    def stop_after_seven(step):
        if step == 7:  # the last checkpoint was written after step 6: one step is lost and redone
            raise Stop

    switcher, proxy = setup()
    with pytest.raises(Stop):
        heal_plan(switcher, PLAN, TRAIN, proxy, heal, checkpoint, key="k", on_step=stop_after_seven)
    assert checkpoint.exists()
    switcher, proxy = setup()  # a new process: fresh model, state only from the checkpoint
    resumed = heal_plan(switcher, PLAN, TRAIN, proxy, heal, checkpoint, key="k")
    assert resumed.resumed_from_step == 6
    assert resumed.curve == straight.curve and resumed.losses == straight.losses
    state = linear_state(switcher)
    assert all(torch.equal(state[k], expected_state[k]) for k in expected_state)
    assert torch.equal(logits(switcher.model, HELDOUT), expected_logits)  # merged LoRA weights too


def test_a_checkpoint_of_other_settings_is_not_resumed(tmp_path):
    checkpoint = tmp_path / "heal.ckpt"
    switcher, proxy = setup()
    with pytest.raises(Stop):
        heal_plan(switcher, PLAN, TRAIN, proxy, settings(), checkpoint, key="a",
                  on_step=lambda step: (_ for _ in ()).throw(Stop) if step == 3 else None)
    switcher, proxy = setup()
    result = heal_plan(switcher, PLAN, TRAIN, proxy, settings(tokens=4 * 128), checkpoint, key="b")
    assert result.resumed_from_step == 0


def healed_folder(tmp_path, lora: bool = False):
    switcher, proxy = setup()
    original_q = switcher.original[1].q_proj.weight.clone()
    result = heal_plan(switcher, PLAN, TRAIN, proxy, settings(tokens=4 * 128, lora=LoraSettings(enabled=lora, lr=1e-2)))
    context = {"model": {"name": "tiny", "source": "tiny:llama"}, "settings": SETTINGS, "bank_id": None}
    folder = save_hybrid(tmp_path / "hybrid", switcher, PLAN, None, context, {"curve": result.curve})
    return switcher, folder, original_q


def test_save_then_load_gives_identical_logits(tmp_path):
    switcher, folder, _ = healed_folder(tmp_path)
    expected = logits(switcher.model, HELDOUT)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hybrid"]  # no temporary folder left behind
    hybrid = load_hybrid(folder, device="cpu", dtype="float32")
    assert hybrid.plan == PLAN and hybrid.tokenizer is None
    assert torch.equal(logits(hybrid.model, HELDOUT), expected)
    data = json.loads((folder / PLAN_FILE).read_text())
    assert data["schema"] == "layerboost.plan/v1" and data["layers"] == list(PLAN.layers)
    generated = hybrid.generate(HELDOUT[:1, :9], max_new_tokens=3)  # the hybrid cache path runs
    assert generated.shape == (1, 12)


def _edit_plan(folder):
    data = json.loads((folder / PLAN_FILE).read_text())
    data["layers"][1] = "none"
    (folder / PLAN_FILE).write_text(json.dumps(data))


def _edit_parts(folder):
    raw = bytearray((folder / PARTS_FILE).read_bytes())
    raw[-1] ^= 0xFF
    (folder / PARTS_FILE).write_bytes(bytes(raw))


def _edit_manifest(folder):
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["settings"]["linear"]["window"] = 8
    (folder / MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize("edit, message", [
    (_edit_plan, r"^plan: hybrid folder '.*' is refused: plan.json changed since it was saved"),
    (_edit_parts, r"^plan: hybrid folder '.*' is refused: linear_parts.safetensors changed since it was saved"),
    (_edit_manifest, r"^plan: hybrid folder '.*' is refused: layerboost_manifest.json was edited"),
])
def test_a_tampered_folder_is_refused(tmp_path, edit, message):
    _, folder, _ = healed_folder(tmp_path)
    edit(folder)
    with pytest.raises(UserError, match=message):
        load_hybrid(folder, device="cpu", dtype="float32")


def test_a_folder_that_is_not_a_hybrid_is_refused(tmp_path):
    with pytest.raises(UserError, match=r"^plan: '.*' is not a hybrid model folder"):
        load_hybrid(tmp_path, device="cpu")


def test_lora_is_merged_into_plain_weights(tmp_path):
    pytest.importorskip("peft")
    switcher, folder, original_q = healed_folder(tmp_path, lora=True)
    model = switcher.model
    assert not any("lora_" in name for name, _ in model.named_parameters())
    assert not (folder / "adapter_config.json").exists() and (folder / "model.safetensors").exists()
    assert type(switcher.original[1].q_proj) is torch.nn.Linear  # wrappers removed
    assert not torch.equal(switcher.original[1].q_proj.weight, original_q)  # the adapter was folded in
    assert switcher.module(0, "linear").q_proj is switcher.original[0].q_proj  # still shared after the merge
    expected = logits(model, HELDOUT)
    hybrid = load_hybrid(folder, device="cpu", dtype="float32")
    assert torch.equal(logits(hybrid.model, HELDOUT), expected)


def test_nothing_to_train_is_refused():
    switcher, proxy = setup()
    with pytest.raises(UserError, match=r"^plan: SNSN has no `linear` layer and heal.lora.enabled is false"):
        heal_plan(switcher, LayerPlan.from_string("SNSN"), TRAIN, proxy, settings())


def test_data_order_and_learning_rate_depend_only_on_seed_and_step():
    assert torch.equal(batch_indices(17, 4, 10, seed=3), batch_indices(17, 4, 10, seed=3))
    epoch = torch.cat([batch_indices(s, 5, 10, seed=0) for s in range(2)])
    assert sorted(epoch.tolist()) == list(range(10))  # every block once per epoch
    assert lr_at(0, 100, 1.0) < lr_at(9, 100, 1.0) == pytest.approx(1.0)
    assert lr_at(99, 100, 1.0) == pytest.approx(0.1, abs=1e-3)


@pytest.mark.parametrize("overrides, message", [
    ([], "error: plan: missing; pass plan="),
    (["plan=LSLN", "heal.tokens=0"], "error: heal.tokens: 0 must be a positive integer"),
    (["plan=LSLN", "heal.seq_len=4096"], "error: heal.seq_len: 4096 is longer than the data blocks"),
])
def test_heal_verb_refuses_bad_input_before_loading(overrides, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["heal", "model=tiny:llama", *overrides])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().startswith(message)
