"""The benchmarks' harness and results document: flags and config overrides in any order, results files
holding their context, RESULTS.md and README's headline block built from them (and checked)."""
from __future__ import annotations

import ast
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import harness  # noqa: E402
import results_doc  # noqa: E402

from layerboost_core.errors import UserError  # noqa: E402


def script(runs=False):
    s = harness.Script("Title line.\n\n    python benchmarks/bench_fake.py\n", str(ROOT / "benchmarks" / "bench_fake.py"),
                       result="fake", title="A fake measurement", runs=runs)
    s.parser.add_argument("--lengths", type=harness.ints, default=(8,))
    s.parser.add_argument("--plans", nargs="+", default=[])
    return s


def test_flags_and_overrides_in_any_order():
    s = script(runs=True)
    args, cfg = s.parse(["seed=3", "--lengths", "16,32", "--plans", "keep-90=SLSL", "fast=LLLL",
                         "model=tiny:llama", "--runs", "2", "data.blocks.heldout=1"])
    assert args.lengths == (16, 32) and args.plans == ["keep-90=SLSL", "fast=LLLL"] and args.runs == 2
    assert cfg.seed == 3 and cfg.model.source == "tiny:llama" and cfg.data.blocks.heldout == 1
    assert s.command == ("python benchmarks/bench_fake.py seed=3 --lengths 16,32 --plans keep-90=SLSL fast=LLLL "
                         "model=tiny:llama --runs 2 data.blocks.heldout=1")


def test_split_arguments_knows_overrides_by_their_config_key():
    flags, overrides = harness.split_arguments(["--x", "a=b", "data.seq_len=4", "+seed=1", "model=m"],
                                               {"data", "seed", "model"})
    assert flags == ["--x", "a=b"] and overrides == ["data.seq_len=4", "+seed=1", "model=m"]


def test_an_unknown_key_is_one_clear_error():
    with pytest.raises(UserError, match=r"'sede=3' is neither a --flag of this script nor a config override.*'seed'"):
        script().parse(["sede=3"])
    with pytest.raises(UserError, match="--runs: 0 must be >= 1"):
        script(runs=True).parse(["--runs", "0"])


def fake_results(folder: Path, name="fake", runs=((1.0, 2.0), (3.0, 2.5))) -> Path:
    s = script(runs=True)
    s.parse(["--result", name, "--results-dir", str(folder), "seed=1"])
    r = s.results()
    for soft, lin in runs:
        r.add_run({"softmax_s": soft, "per_length": {"8": {"linear_s": lin}}, "raw": [soft, lin], "label": "x"})
    r.summarize("ratio", [0.5, 0.25, float("nan")])
    r.describe(device="cpu:test", dtype="float32")
    r.table("Seconds", ["plan", "seconds", "ratio"], [["all-softmax", 2.0, 1.0], ["a|b", 2.25, float("inf")]],
            note="fake numbers")
    r.headline("all-linear speed-up", 1.5, "x")
    r.note("made by a test")
    return r.write(echo=False)


def test_best_files_give_their_plan_and_the_settings_it_was_picked_with(tmp_path):
    best = tmp_path / "fastest.json"
    heads = {"mixed1": {"kept_heads": [[0], [2], [1], [0]]}}
    best.write_text(json.dumps({"plan": "SL1N", "origin": {"label": "fastest"}, "settings": heads}))
    assert harness.named_plans("a=SSLL", str(best), 4) == {"a": "SSLL", "fastest:fastest": "SL1N"}
    assert harness.best_settings(str(best)) == heads
    assert harness.best_settings("") == {}
    from layerboost_core.workbench import WorkbenchSettings

    own = WorkbenchSettings()
    laid = harness.with_best_settings(own, str(best))
    assert laid.options["mixed1"] == heads["mixed1"] and laid.options["linear"] == own.options["linear"]
    assert harness.with_best_settings(own, "") is own
    with pytest.raises(UserError, match="layers"):  # a best file of another model: one line, not a crash later
        harness.named_plans("", str(best), 30)


def test_a_results_file_holds_its_context(tmp_path):
    data = json.loads(fake_results(tmp_path).read_text())
    assert data["schema"] == harness.SCHEMA and data["name"] == "fake" and data["title"] == "A fake measurement"
    assert data["script"] == "benchmarks/bench_fake.py"
    assert data["command"].startswith("python benchmarks/bench_fake.py --result fake --results-dir ")
    assert data["settings"]["seed"] == 1 and data["flags"]["runs"] == 1 and "results_dir" not in data["flags"]
    if (ROOT / ".git").exists():
        assert len(data["git"]["commit"]) == 40 and isinstance(data["git"]["dirty"], bool)
    else:  # an exported tree: no git to ask
        assert data["git"] == {"commit": None, "dirty": None}
    assert data["device"] == "cpu:test" and data["dtype"] == "float32" and data["torch"]
    assert data["date"].endswith("+00:00")
    assert data["runs"][1] == {"softmax_s": 3.0, "per_length": {"8": {"linear_s": 2.5}}, "raw": [3.0, 2.5], "label": "x"}
    assert data["summary"]["softmax_s"] == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 2}
    assert data["summary"]["per_length / 8 / linear_s"] == {"median": 2.25, "min": 2.0, "max": 2.5, "n": 2}
    assert data["summary"]["ratio"]["n"] == 2 and "raw" not in data["summary"]
    assert data["tables"][0]["rows"][1] == ["a|b", 2.25, "inf"]  # strict JSON: no NaN/Infinity tokens
    assert data["headline"] == [{"name": "all-linear speed-up", "value": 1.5, "unit": "x"}]


def test_the_document_is_built_from_the_files(tmp_path):
    results = tmp_path / "results"
    fake_results(results)
    doc, readme = tmp_path / "RESULTS.md", tmp_path / "README.md"
    readme.write_text(f"# Project\n\ntext\n\n{results_doc.BEGIN}\n{results_doc.END}\n\nend\n")
    args = ["--results-dir", str(results), "--doc", str(doc), "--readme", str(readme)]
    with pytest.raises(SystemExit) as stale:
        results_doc.main(["--check", *args])
    assert stale.value.code == 1
    results_doc.main(args)
    text = doc.read_text()
    assert '<a id="fake"></a>\n## A fake measurement' in text and "- [A fake measurement](#fake)" in text
    assert "`python benchmarks/bench_fake.py --result fake" in text and "| dtype | float32 |" in text
    assert "| plan | seconds | ratio |" in text and "| a\\|b | 2.25 | inf |" in text and "fake numbers" in text
    assert "| softmax_s | 2 | 1 | 3 | 2 |" in text and "- made by a test" in text
    block = readme.read_text()
    assert block.startswith("# Project\n\ntext\n\n") and block.endswith("\n\nend\n")
    assert "| all-linear speed-up | 1.5 x | [A fake measurement](benchmarks/RESULTS.md#fake) |" in block
    with pytest.raises(SystemExit) as fresh:
        results_doc.main(["--check", *args])
    assert fresh.value.code == 0
    readme.write_text(block.replace("1.5 x", "9 x"))
    assert results_doc.check(results, doc, readme) == [
        f"{readme}: the block between {results_doc.BEGIN} and {results_doc.END} is not what the results files give"]


def test_no_files_is_said_so(tmp_path):
    assert "No results files yet" in results_doc.build_document([])
    assert "No measured headline figures yet" in results_doc.build_headline([])
    with pytest.raises(results_doc.ResultsError, match="needs exactly one"):
        results_doc.replace_block("no markers", "x")


def test_a_file_of_another_schema_is_named(tmp_path):
    (tmp_path / "odd.json").write_text(json.dumps({"schema": "other"}))
    with pytest.raises(results_doc.ResultsError, match="odd.json: schema is 'other'"):
        results_doc.load_results(tmp_path)


def test_committed_document_matches_the_committed_results():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "results_doc.py"), "--check"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


SCRIPTS = sorted(p for p in (ROOT / "benchmarks").glob("*.py") if p.name.startswith("bench_") or p.name == "gpu_check.py")


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_every_script_runs_on_the_harness(path, capsys):
    """Each script's docstring opens with the command that runs it, and it parses through the harness (its
    --help is the harness's usage line plus its own flags)."""
    source = path.read_text()
    doc = ast.get_docstring(ast.parse(source))
    assert f"python benchmarks/{path.name}" in "\n".join(doc.splitlines()[:8]), "the command opens the docstring"
    assert source.rstrip().endswith('if __name__ == "__main__":\n    run(main)')
    module = importlib.import_module(path.stem)
    with pytest.raises(SystemExit) as done:
        module.main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: python benchmarks/{path.name} [--flag ...] [key=value ...]")
    assert "--result NAME" in out
