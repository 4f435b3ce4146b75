"""A plan file carries what it was made with: `export|heal|bench|eval plan=<file>` adopt it, refuse an override
that contradicts it in one line, and take overrides of what it does not record."""
from __future__ import annotations

import json

import pytest

from layerboost.cli import main
from layerboost.config import compose
from layerboost.plan_file import adopt_plan_settings, flatten, override_keys
from layerboost.settings import workbench_settings
from layerboost_core.errors import UserError
from layerboost_core.plan import LayerPlan

# What a search on the tiny model with non-default data and workload records in its best files.
SEARCHED = ["model=tiny:llama", "data.source=builtin:pydoc", "workload.prefill=96", "attention.linear.window=16",
            "transfer.batches=2"]


def plan_file(tmp_path, overrides=SEARCHED, plan="SLNS"):
    """A best file as the report writes it, made under `overrides`."""
    settings = workbench_settings(compose(overrides))
    path = tmp_path / "keep-90pct.json"
    path.write_text(json.dumps(LayerPlan.from_string(plan).to_json(
        model={"name": settings.model.name}, settings=settings.options, made_with=settings.record())))
    return path, settings


def adopted(overrides):
    return adopt_plan_settings(compose(overrides), overrides, compose([]))


def test_the_file_alone_gives_the_settings_it_was_made_with(tmp_path):
    path, searched = plan_file(tmp_path)
    args = [f"plan={path}"]
    assert workbench_settings(adopted(args)) == searched  # model, data, workload, options, proxy, transfer
    assert workbench_settings(compose(args)) != searched  # without adopting, the defaults would be used


def test_an_override_contradicting_the_file_is_refused_naming_the_field_and_both_values(tmp_path):
    path, _ = plan_file(tmp_path)
    with pytest.raises(UserError) as refused:
        adopted([f"plan={path}", "workload.prefill=128"])
    message = str(refused.value)
    assert message.startswith("workload.prefill:") and "96" in message and "128" in message and "\n" not in message
    with pytest.raises(UserError, match=r"^model.name: .*tiny:llama.*smollm2-135m"):  # a group choice counts too
        adopted([f"plan={path}", "model=smollm2-135m"])
    with pytest.raises(UserError, match=r"^attention.linear.window:"):
        adopted([f"plan={path}", "attention.linear.window=64"])


def test_an_override_the_file_agrees_with_or_does_not_record_is_taken(tmp_path):
    path, searched = plan_file(tmp_path)
    cfg = adopted([f"plan={path}", "workload.prefill=96", "device=cpu", "dtype=float32", "out=/tmp/x",
                   "heal.tokens=512", "proxy.batch_size=1"])
    settings = workbench_settings(cfg)
    assert settings.workload == searched.workload and settings.data == searched.data
    assert cfg.out == "/tmp/x" and cfg.heal.tokens == 512 and cfg.dtype == "float32"
    assert settings.proxy.batch_size == 1  # recorded, but it changes no result


def test_plans_without_recorded_settings_keep_the_config():
    cfg = adopted(["plan=SLNS", "model=tiny:llama"])
    assert cfg.model.source == "tiny:llama"


def test_flatten_and_override_keys():
    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": None}) == {"a.b": 1, "a.c.d": [1, 2], "e": None}
    assert override_keys(["model=x", "+data.blocks.heldout=2", "~foo=1", "bare"]) == ["model", "data.blocks.heldout",
                                                                                      "foo"]


def test_export_of_a_file_from_another_model_needs_no_model_argument(tmp_path, capsys):
    """The default model is SmolLM2 (30 layers); a 4-layer tiny plan file exports onto its own model."""
    path, _ = plan_file(tmp_path, ["model=tiny:llama", "transfer.batches=1", "workload.prefill=64"], "SSNS")
    main(["export", f"plan={path}", f"out={tmp_path / 'folder'}", "progress=false"])
    written = json.loads((tmp_path / "folder" / "plan.json").read_text())
    assert written["plan"] == "SSNS" and written["made_with"]["model"]["source"] == "tiny:llama"
    assert written["made_with"]["workload"]["prefill"] == 64


def test_export_refuses_a_contradicting_override_in_one_line_and_writes_nothing(tmp_path, capsys):
    path, _ = plan_file(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["export", f"plan={path}", "data.source=builtin:news", f"out={tmp_path / 'folder'}"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: data.source:"), err
    assert not (tmp_path / "folder").exists()
