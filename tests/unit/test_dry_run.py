"""`layerboost search dry_run=true`: the memory and time plan from a model folder holding only config.json
(no weights), printed, exit 0; a real run whose setting cannot fit is refused before any weights load, in one
line naming the setting, exit 2."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from layerboost.cli import main

CONFIGS = Path(__file__).resolve().parents[1] / "data" / "configs"


def config_folder(tmp_path: Path, name: str) -> Path:
    """A model folder with only the public config.json of `name`: any attempt to load weights fails."""
    folder = tmp_path / name
    folder.mkdir()
    shutil.copy(CONFIGS / f"{name}.json", folder / "config.json")
    return folder


@pytest.mark.timeout(120)
def test_dry_run_prints_the_plan_without_weights(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = config_folder(tmp_path, "llama3-8b")
    main(["search", "dry_run=true", f"model={folder}", "device=cpu", "dtype=bfloat16", f"output_dir={tmp_path}",
          "runner.num_workers=3"])
    out = capsys.readouterr().out
    assert out.startswith(f"memory plan: {folder} on cpu (bfloat16), 8.030e9 parameters"), out
    for row in ("weights", "bank (linear)", "reference", "activations", "total per actor", "driver"):
        assert f"\n{row} " in out, row
    assert "runner.num_workers=3" in out
    assert not (tmp_path / "studies").exists()


@pytest.mark.timeout(120)
def test_a_setting_that_cannot_fit_is_refused_in_one_line_before_loading(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = config_folder(tmp_path, "qwen2.5-0.5b")
    with pytest.raises(SystemExit) as exit_:
        main(["search", f"model={folder}", "device=cpu", "runner.num_workers=100000", f"output_dir={tmp_path}"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: runner.num_workers: 100000 actors"), err
