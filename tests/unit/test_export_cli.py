"""`layerboost export` refuses a plan made for another model in one line, exit 2, and writes nothing."""
from __future__ import annotations

import json

import pytest

from layerboost.cli import main
from layerboost_core.models import load_model


def refused(args, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(["export", *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_a_plan_of_another_length_is_refused(tmp_path, capsys):
    err = refused(["model=tiny:llama", "plan=SLN", f"out={tmp_path / 'out'}", "progress=false"], capsys)
    assert err.startswith("error: plan: has 3 layers but the model has 4")
    assert not (tmp_path / "out").exists()


def test_a_plan_json_of_another_model_is_refused(tmp_path, capsys):
    other = load_model("tiny:qwen2", "tiny:qwen2").info
    from layerboost_core.plan import LayerPlan

    path = tmp_path / "plan.json"
    path.write_text(json.dumps(LayerPlan.from_string("SSNN").to_json(model=other, settings={})))
    err = refused(["model=tiny:llama", f"plan={path}", f"out={tmp_path / 'out'}", "progress=false"], capsys)
    assert err.startswith("error: plan:") and "tiny:qwen2" in err and "fingerprint" in err, err
    assert not (tmp_path / "out").exists()


def test_export_without_a_plan_says_what_to_pass(capsys):
    assert refused(["model=tiny:llama"], capsys).startswith("error: plan: missing; pass plan=")
