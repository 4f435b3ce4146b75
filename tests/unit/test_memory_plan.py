"""Memory plan: parameter counts of public configs on the meta device, reference cache sizes, the table,
check_fits's one-line refusals, and the estimate of a tiny model against its real tensors."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from layerboost_core.errors import UserError
from layerboost_core.memory_plan import (GB, H100_80GB, check_fits, load_config, memory_plan,
                                         reference_bytes)
from layerboost_core.models import tiny_config
from layerboost_core.patch import PlanSwitcher

from ..conftest import LINEAR_SETTINGS, MODEL_TYPES, build_tiny_model

CONFIGS = Path(__file__).parent.parent / "data" / "configs"
GPU_80GB = 80 * 10**9


def plan_of(model: str, **settings):
    """A plan of a shipped config; speed fixed so no test measures this machine."""
    return memory_plan(CONFIGS / f"{model}.json", name=model, speed=H100_80GB, **settings)


def llama_on_gpu(**settings):
    base = dict(device="cuda", device_memory_bytes=GPU_80GB, heldout_blocks=16, seq_len=2048, num_workers=1)
    return plan_of("llama3-8b", **{**base, **settings})


def refused(setting: str, plan) -> str:
    """check_fits's message, asserted to be one line naming `setting`."""
    with pytest.raises(UserError) as error:
        check_fits(plan)
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"{setting}: "), message
    return message


@pytest.mark.parametrize("model, known", [("llama3-8b", 8.03e9), ("qwen2.5-0.5b", 0.494e9), ("mistral-7b", 7.24e9)])
def test_parameter_counts_of_public_configs(model, known):
    plan = plan_of(model, device="cuda", device_memory_bytes=GPU_80GB)
    assert plan.parameters == pytest.approx(known, rel=0.01)
    assert 0 <= plan.row("weights").bytes - 2 * plan.parameters < 10**4  # bf16 on cuda, plus the RoPE buffers
    assert dict(plan.weights_by_dtype)["bfloat16"] == plan.row("weights").bytes


def test_exact_reference_is_16_8_gb_and_top_k_is_tiny():
    targets = 16 * 2047
    exact = llama_on_gpu().row("reference").bytes
    assert exact == targets * (128256 * 4 + 20) == reference_bytes(16, 2048, 128256, None)
    assert round(exact / GB, 1) == 16.8
    top_k = llama_on_gpu(reference_top_k=64).row("reference").bytes
    assert top_k == targets * (64 * 8 + 4 + 20)  # (p fp32, id int32) pairs, tail mass, per-token stats
    assert top_k / GB < 0.02


def test_table_renders_every_row_and_the_verdict():
    plan = llama_on_gpu(num_workers=4)
    table = plan.table()
    for row in plan.rows:
        assert re.search(rf"^{re.escape(row.name)} +{row.bytes / GB:.3f}  ", table, re.M), row.name
    assert "exact reference" in table and "does NOT fit" in table and "evaluations/hour" in table
    assert "fits" in llama_on_gpu(num_workers=1).table()


def test_check_fits_names_the_heldout_blocks_when_the_exact_reference_cannot_fit():
    message = refused("data.blocks.heldout", llama_on_gpu(heldout_blocks=64))
    assert message.startswith("data.blocks.heldout: 64 blocks x 2048 tokens need a 67.2 GB reference per actor "
                              "(exact), only ")
    assert message.endswith("; set proxy.reference_top_k or fewer blocks")
    check_fits(llama_on_gpu(heldout_blocks=64, reference_top_k=64))  # the same blocks fit with a top-k cache


def test_check_fits_names_num_workers_and_accepts_exactly_the_capacity():
    plan = llama_on_gpu(num_workers=4)
    capacity = plan.actors_per_device
    assert 1 <= capacity < 4
    check_fits(llama_on_gpu(num_workers=capacity))
    message = refused("runner.num_workers", plan)
    assert message.endswith(f"set runner.num_workers={capacity} and runner.num_gpus={plan.num_gpus_per_actor:g}")
    assert plan.num_gpus_per_actor * capacity <= 1 < plan.num_gpus_per_actor * (capacity + 1)


def test_check_fits_names_the_dtype_when_fp32_weights_alone_do_not_fit():
    on_64gb = dict(device_memory_bytes=64 * 10**9)
    # 32 GB of weights per actor plus the driver's own 32 GB exceed 90% of 64 GB before any reference.
    assert refused("dtype", llama_on_gpu(dtype="float32", **on_64gb)).endswith("use dtype=bfloat16 or a larger device")
    check_fits(llama_on_gpu(dtype="bfloat16", **on_64gb))


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_tiny_model_estimate_matches_its_real_tensors(model_type):
    plan = memory_plan(tiny_config(model_type), device="cpu", dtype="float32", linear=LINEAR_SETTINGS["linear"])
    model = build_tiny_model(model_type)
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in [*model.parameters(), *model.buffers()]}
    assert plan.row("weights").bytes == sum(storages.values())
    assert plan.parameters == sum(p.numel() for p in model.parameters())
    learned = PlanSwitcher(model, LINEAR_SETTINGS).trainable_parts("linear")
    bank = sum(p.numel() * p.element_size() for part in learned for p in part.parameters())
    assert plan.row("bank (linear)").bytes == 2 * bank  # on a CPU the module and the Bank's state dicts
    # Defaults: this machine's RAM (as /proc/meminfo reports it) and its measured speed.
    mem_total_kb = int(re.search(r"MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text()).group(1))
    assert plan.device_memory_bytes == mem_total_kb * 1024
    assert plan.evaluations_per_hour > 0
    check_fits(plan)


def test_config_sources_and_bad_input(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text((CONFIGS / "qwen2.5-0.5b.json").read_text())
    assert load_config(folder).vocab_size == load_config(CONFIGS / "qwen2.5-0.5b.json").vocab_size == 151936
    with pytest.raises(UserError, match=r"^model\.source: 'no/such-model' is no local folder or config\.json "):
        load_config("no/such-model")  # offline (HF_HUB_OFFLINE above): refused at once, not retried
    with pytest.raises(UserError, match=r"^model\.source: unknown model_type 'nope' in the config$"):
        load_config({"model_type": "nope"})
    with pytest.raises(UserError, match=r"^proxy\.reference_top_k: 0 must be a positive integer or null$"):
        llama_on_gpu(reference_top_k=0)
