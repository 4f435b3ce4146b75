"""Offline lm-eval tasks: generated deterministically from held-out text, loaded and scored by lm-eval offline,
on a tiny random model, patched or not. Unknown or unreachable tasks fail with one clear line."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from layerboost_core import lm_eval_tasks
from layerboost_core.errors import UserError
from layerboost_core.lm_eval_tasks import OFFLINE_TASKS, evaluate_tasks, write_offline_tasks
from layerboost_core.patch import PlanSwitcher
from layerboost_core.plan import LayerPlan

from ..conftest import LINEAR_SETTINGS, build_tiny_model

SETTINGS = {"n_examples": 6, "passkey_context": 256, "mqar_pairs": 4, "cloze_context": 64, "seed": 0}


@pytest.fixture(scope="module")
def tokenizer():
    """The built-in SmolLM2 tokenizer (converted once into the cache, then about a second to load)."""
    from transformers import AutoTokenizer

    from layerboost_core.models import builtin_smollm2_folder

    return AutoTokenizer.from_pretrained(str(builtin_smollm2_folder()))


@pytest.fixture(scope="module")
def documents():
    """Held-out documents of the built-in text (a slice: enough for a few examples of every task)."""
    from layerboost_core.data import SPLITS, load_documents, split_of

    fractions = {"calibration": 0.1, "train": 0.6, "heldout": 0.3}
    assert "heldout" in SPLITS
    return [doc for doc in load_documents("builtin") if split_of(doc, fractions) == "heldout"][:40]


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory, documents, tokenizer) -> Path:
    return write_offline_tasks(tmp_path_factory.mktemp("tasks"), documents, tokenizer, SETTINGS)


@pytest.fixture
def offline(monkeypatch):
    """No network for datasets / the hub, as in CI (the flags are read at import, so patch them too)."""
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def rows(folder: Path, task: str) -> list[dict]:
    return [json.loads(line) for line in (folder / f"{task}.jsonl").read_text().splitlines()]


def test_files_are_complete_and_use_absolute_paths(task_dir):
    assert task_dir.is_absolute() and (task_dir / lm_eval_tasks.MANIFEST).is_file()
    for task in OFFLINE_TASKS:
        config = yaml.safe_load((task_dir / f"{task}.yaml").read_text())
        assert config["task"] == task and config["dataset_path"] == "json" and config["test_split"] == "test"
        data_file = Path(config["dataset_kwargs"]["data_files"]["test"])
        assert data_file.is_absolute() and data_file == task_dir / f"{task}.jsonl" and data_file.is_file()
        assert len(rows(task_dir, task)) == SETTINGS["n_examples"]
    assert not [p.name for p in task_dir.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_generation_is_deterministic_and_reused(tmp_path, task_dir, documents, tokenizer):
    again = write_offline_tasks(tmp_path, documents, tokenizer, SETTINGS)
    assert again.name == task_dir.name  # the folder name is the content hash
    for task in OFFLINE_TASKS:
        assert (again / f"{task}.jsonl").read_bytes() == (task_dir / f"{task}.jsonl").read_bytes()
    stamp = (again / "lb_passkey.jsonl").stat().st_mtime_ns
    assert write_offline_tasks(tmp_path, documents, tokenizer, SETTINGS) == again
    assert (again / "lb_passkey.jsonl").stat().st_mtime_ns == stamp  # reused, not rewritten
    other = write_offline_tasks(tmp_path, documents, tokenizer, {**SETTINGS, "seed": 1})
    assert other != again and rows(other, "lb_passkey") != rows(again, "lb_passkey")


def test_passkey_holds_the_key_at_the_requested_length(tmp_path, task_dir, documents, tokenizer):
    for context_len, folder in ((256, task_dir),
                                (512, write_offline_tasks(tmp_path, documents, tokenizer,
                                                          {**SETTINGS, "n_examples": 3, "passkey_context": 512}))):
        for row in rows(folder, "lb_passkey"):
            key = row["choices"][row["label"]]
            assert key == row["key"] and re.fullmatch(r"\d{5}", key)
            assert f"The pass key is {key}. Remember it. {key} is the pass key." in row["context"]
            assert row["context"].endswith("What is the pass key? The pass key is")
            assert len(set(row["choices"])) == 5 and len({c[:4] for c in row["choices"]}) == 1
            n_tokens = len(tokenizer(row["context"], add_special_tokens=False).input_ids)
            assert n_tokens == row["n_tokens"] and 0.95 * context_len <= n_tokens <= context_len


def test_cloze_target_ends_a_sentence_and_occurs_earlier(task_dir, tokenizer):
    for row in rows(task_dir, "lb_cloze"):
        word = row["target"][1:]
        assert row["target"].startswith(" ") and word.isalpha() and len(word) >= 4
        assert re.search(rf"\b{word}\b", row["context"], flags=re.IGNORECASE)
        assert row["context"] == row["context"].rstrip()
        assert SETTINGS["cloze_context"] // 2 <= row["n_tokens"] <= 2 * SETTINGS["cloze_context"]


def test_mqar_choices_are_the_values_in_context(task_dir):
    for row in rows(task_dir, "lb_mqar"):
        pairs = re.findall(r"^(\w+) lives in (\w+)\.$", row["context"], flags=re.MULTILINE)
        stated = dict(pairs[: SETTINGS["mqar_pairs"]])
        asked = re.findall(r"Where does (\w+) live\?", row["context"])[-1]
        assert row["choices"] == list(stated.values()) and len(row["choices"]) == SETTINGS["mqar_pairs"]
        assert row["choices"][row["label"]] == stated[asked]
        assert row["context"].endswith(f"Answer: {asked} lives in")


def test_tasks_load_and_score_offline(offline, task_dir, tokenizer):
    from lm_eval.tasks import TaskManager

    assert set(OFFLINE_TASKS) <= set(TaskManager(include_path=str(task_dir), include_defaults=False).all_tasks)
    scores = evaluate_tasks(build_tiny_model("llama", 2), tokenizer, list(OFFLINE_TASKS), task_dir,
                            batch_size=4, limit=3)
    assert set(scores) == set(OFFLINE_TASKS)
    assert all(0.0 <= value <= 1.0 for value in scores.values())


def test_patched_model_is_scored_as_given(offline, task_dir, tokenizer):
    model = build_tiny_model("llama", 2)
    switcher = PlanSwitcher(model, LINEAR_SETTINGS)
    switcher.apply(LayerPlan.from_string("LN"))
    calls = []
    for layer in switcher.layers:
        layer.self_attn.register_forward_hook(lambda module, args, output: calls.append(type(module).__name__))
    scores = evaluate_tasks(model, tokenizer, ["lb_passkey", "lb_mqar"], task_dir, batch_size=2, limit=2)
    assert set(scores) == {"lb_passkey", "lb_mqar"}
    assert {"LinearSlidingWindowAttention", "NoAttention"} <= set(calls)  # our modules ran, not a reloaded copy
    assert str(switcher.plan) == "LN"


def test_unknown_offline_task_suggests_the_closest(task_dir, tokenizer):
    with pytest.raises(UserError, match=r"lb_pasky.*did you mean 'lb_passkey'"):
        evaluate_tasks(build_tiny_model("llama", 2), tokenizer, ["lb_pasky"], task_dir)


def test_missing_task_folder_is_refused(tmp_path, tokenizer):
    with pytest.raises(UserError, match="write_offline_tasks"):
        evaluate_tasks(build_tiny_model("llama", 2), tokenizer, ["lb_cloze"], tmp_path)


def test_builtin_tasks_unknown_or_unreachable_fail_with_one_line(offline, monkeypatch, tmp_path, task_dir, tokenizer):
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path)  # nothing cached: the data is unreachable
    model = build_tiny_model("llama", 2)
    with pytest.raises(UserError, match=r"unknown lm-eval task 'hellaswg' \(did you mean 'hellaswag'") as error:
        evaluate_tasks(model, tokenizer, ["hellaswg"], task_dir)
    assert "\n" not in str(error.value)
    with pytest.raises(UserError, match=r"lm-eval task 'hellaswag' cannot load its data") as error:
        evaluate_tasks(model, tokenizer, ["lb_cloze", "hellaswag"], task_dir, limit=1)
    assert "\n" not in str(error.value)


def test_settings_and_documents_are_validated(tmp_path, documents, tokenizer):
    with pytest.raises(UserError, match=r"n_exmples.*did you mean 'n_examples'"):
        write_offline_tasks(tmp_path, documents, tokenizer, {"n_exmples": 3})
    with pytest.raises(UserError, match=r"eval.passkey_context: 0 must be an integer >= 64"):
        write_offline_tasks(tmp_path, documents, tokenizer, {"passkey_context": 0})
    with pytest.raises(UserError, match="no held-out documents"):
        write_offline_tasks(tmp_path, ["", "  "], tokenizer, SETTINGS)
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_lm_eval_batch_shrinks_for_large_vocabularies():
    from layerboost_core.lm_eval_tasks import LOGITS_BYTES_PER_BATCH, batch_for_vocabulary

    # SmolLM2 (49,152) at 1,024 tokens: 201 MB of logits a row -> 5 rows fit the budget; Gemma 3 (262,144): 1
    assert batch_for_vocabulary(8, 49152, 1024) == LOGITS_BYTES_PER_BATCH // (1024 * 49152 * 4) == 5
    assert batch_for_vocabulary(8, 262144, 1024) == 1
    assert batch_for_vocabulary(2, 1000, 128) == 2  # never above the configured batch
